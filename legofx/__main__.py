import sys

from legofx.cli.main import main

sys.exit(main())
