"""`python -m node ...` runs a node (see `node.cli`; `python -m node.daemon ...` is the same)."""

from node.cli import exit_now, main

exit_now(main())
