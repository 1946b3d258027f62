""" ``python -m dropcluster_timm`` (and ``accelerate launch -m dropcluster_timm train ...``): the command line."""
import sys

from .cli import main

sys.exit(main())
