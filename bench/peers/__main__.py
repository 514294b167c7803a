"""``python -m bench.peers [--rounds N] [--jobs N] [--clients N] [--warmup N]``: the peers benchmark alone."""

import sys

from bench.peers.compare import main

sys.exit(main())
