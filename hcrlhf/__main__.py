"""``python -m hcrlhf`` is the ``hcrlhf`` command; it is how ``torchrun`` starts it on several processes:
``torchrun --nproc-per-node 8 -m hcrlhf run CONFIG.yaml`` (docs/distributed.md)."""

import sys

from hcrlhf.cli import main

sys.exit(main())
