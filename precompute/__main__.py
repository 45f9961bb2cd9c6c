"""`python -m precompute COMMAND ...`: the same as the `featuregeom` console script."""

import sys

from precompute.cli import main

sys.exit(main())
