"""``python -m lowbit ...`` (and ``torchrun --nproc_per_node N -m lowbit qat ...``): the ``lowbit`` command."""

import sys

from lowbit.cli import main

sys.exit(main())
