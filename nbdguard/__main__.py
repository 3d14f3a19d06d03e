import sys

from nbdguard.cli import main

sys.exit(main())
