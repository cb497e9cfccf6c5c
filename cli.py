"""``python cli.py ...`` from a checkout, no install needed: the command line lives in
:mod:`mmcache.cli` (installed as the ``mmcache`` command)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the checkout's mmcache/, from any folder

from mmcache.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
