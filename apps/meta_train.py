"""The `km-meta-train` program, run from a checkout:
`python apps/meta_train.py --help`.

Its flags and `main` live in `km_tf/cli/meta_train.py`; `make setup` (or
`pip install -e .`) installs km_tf.
"""

from km_tf.cli import meta_train

if __name__ == "__main__":
    meta_train.run()
