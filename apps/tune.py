"""The `km-tune` program, run from a checkout: `python apps/tune.py --help`.

Its flags and `main` live in `km_tf/cli/tune.py`; `make setup` (or
`pip install -e .`) installs km_tf.
"""

from km_tf.cli import tune

if __name__ == "__main__":
    tune.run()
