import sys

from fedbabu.cli import main

sys.exit(main())
