import sys

from .cli.run import command

sys.exit(command())
