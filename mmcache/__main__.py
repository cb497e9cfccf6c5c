"""``python -m mmcache ...`` = the ``mmcache`` command."""

import sys

from mmcache.cli import main

sys.exit(main())
