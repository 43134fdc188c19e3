import sys

from planner.cli.main import main  # light: the commands and their heavy imports load inside main()

sys.exit(main())
