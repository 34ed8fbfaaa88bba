import sys

from chemtwin.cli import main

sys.exit(main())
