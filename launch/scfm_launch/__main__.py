import sys

from scfm_launch.cli import main

sys.exit(main())
