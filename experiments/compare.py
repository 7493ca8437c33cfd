"""`python -m experiments.compare`: predicted vs measured sharpness drift for any network and label noise.

The command line and the library live in `experiments.comparison.compare` (`compare`, `Row`, `parse_rule`,
`MODELS`); this module is the entry point and re-exports them.
"""
import sys

from experiments.comparison.compare import MODELS, Row, compare, main, parse_rule, predict_row

__all__ = ["MODELS", "Row", "compare", "main", "parse_rule", "predict_row"]

if __name__ == "__main__":
    sys.exit(main())
