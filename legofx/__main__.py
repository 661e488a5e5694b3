import sys

from legofx.cli import main

sys.exit(main())
