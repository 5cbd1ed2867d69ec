"""``python -m clipinvert``: the command line, as a module.

What ``torchrun -m clipinvert train …`` runs in every process (docs/training-ddp.md).
"""

import sys

from .cli import main

sys.exit(main())
