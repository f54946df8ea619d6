"""``python -m megatron_qrm.planning ...`` = ``qrm plan ...``."""

import sys

from megatron_qrm.planning.cli import main

sys.exit(main())
