"""``python -m benchmarks`` == ``python -m benchmarks.run_all``."""

import sys

from benchmarks.run_all import main

sys.exit(main())
