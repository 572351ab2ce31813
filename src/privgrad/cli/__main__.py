import sys

from privgrad.cli import main

sys.exit(main())
