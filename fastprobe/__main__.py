"""python -m fastprobe: the fastprobe command."""

import sys

from .cli import main

sys.exit(main())
