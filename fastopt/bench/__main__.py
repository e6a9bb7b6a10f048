"""``python -m fastopt.bench [--quick] [--ops adamw,...] [--out DIR] [--device cpu|cuda]``: the report."""
import sys

from . import main

sys.exit(main())
