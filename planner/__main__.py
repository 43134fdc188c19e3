import sys

try:
    from planner.cli.main import main
except (KeyboardInterrupt, ImportError) as exc:  # Ctrl-C while the imports run: one line, no traceback
    if not isinstance(exc, KeyboardInterrupt) and not isinstance(exc.__context__, KeyboardInterrupt):
        raise
    sys.stderr.write("podplan: interrupted\n")
    sys.exit(130)

sys.exit(main())
