import sys

from mlcontrast.train.cli import main

sys.exit(main())
