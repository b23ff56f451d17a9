"""``python -m dpl_zoo ...``: the command line, e.g. the torchrun entry
``torchrun --nproc_per_node=8 -m dpl_zoo train RECIPE``."""
import sys

from .cli import main

sys.exit(main())
