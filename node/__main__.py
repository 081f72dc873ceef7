"""`python -m node ...` runs the node daemon (same arguments as `python -m node.daemon`)."""

import sys

from node.daemon import main

sys.exit(main())
