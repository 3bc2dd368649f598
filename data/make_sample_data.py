"""`python data/make_sample_data.py --output_dir=DIR ...`: the sample-data generator's command.

The generator itself is `estimator_ft.sample_data` (one copy, which the tests and `estimator-ft
bench` import); this script only runs it, so it needs the installed package (`make install`).
"""
import sys

from estimator_ft import sample_data

if __name__ == "__main__":
  sys.exit(sample_data.main())
