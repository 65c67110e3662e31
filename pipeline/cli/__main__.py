"""``python -m pipeline.cli``: the genbench command (torchrun and srun start it so)."""

import sys

from pipeline.cli import main

sys.exit(main())
