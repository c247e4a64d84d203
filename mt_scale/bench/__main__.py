"""`python -m mt_scale.bench`: the same as `mt-bench`."""

import sys

from mt_scale.cli import bench_main

sys.exit(bench_main())
