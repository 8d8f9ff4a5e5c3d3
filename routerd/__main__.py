import sys

from routerd.cli import main

sys.exit(main())
