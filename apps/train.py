"""The `km-train` program, run from a checkout: `python apps/train.py --help`.

Its flags and `main` live in `km_tf/cli/train.py`; `make setup` (or
`pip install -e .`) installs km_tf.
"""

from km_tf.cli import train

if __name__ == "__main__":
    train.run()
