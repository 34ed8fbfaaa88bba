import sys

from chemtwin.cli import run

sys.exit(run())
