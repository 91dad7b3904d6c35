import sys

from hopfield_aa.cli import main

sys.exit(main())
