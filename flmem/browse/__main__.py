"""``python -m flmem.browse [TARGET] [options]``: the same as ``flmem browse``."""
import sys

from flmem.browse.cli import browse_main

sys.exit(browse_main())
