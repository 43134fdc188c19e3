import sys

try:
    from planner.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the imports run: one line, no traceback
    sys.stderr.write("podplan: interrupted\n")
    sys.exit(130)

sys.exit(main())
