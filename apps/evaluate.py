"""The `km-evaluate` program, run from a checkout: `python apps/evaluate.py --help`.

Its flags and `main` live in `km_tf/cli/evaluate.py`; `make setup` (or
`pip install -e .`) installs km_tf.
"""

from km_tf.cli import evaluate

if __name__ == "__main__":
    evaluate.run()
