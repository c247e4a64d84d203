"""`python -m mt_scale.bench.gpu gpu ...`: the same as `mt-bench gpu ...`."""

import sys

from mt_scale.bench.gpu.cli import main

sys.exit(main())
