import sys

from .cli.run import console

sys.exit(console())
