"""`python -m estimator_ft ...` is the same as the `estimator-ft` command."""
from estimator_ft.cli import run_main

if __name__ == "__main__":
  run_main()
