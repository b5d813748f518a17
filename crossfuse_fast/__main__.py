"""``python -m crossfuse_fast ...`` is the ``crossfuse`` command (and what torchrun runs:
``torchrun --nproc-per-node N -m crossfuse_fast train-fusion ...``)."""
import sys

from .cli import main

sys.exit(main())
