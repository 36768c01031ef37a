"""`km-apply-pack`: template + plan + pack -> the task's `.tflite` (no TF).

    km-apply-pack base_int8.tflite birds_int8.kmpack birds.tflite

For Linux devices (Raspberry Pi, Coral Dev Board: run `edgetpu_compiler`
on the result, never on the template, see tflite/DEPLOY.md). The plan is
read from next to the template (`base_int8.kmplan`) unless `--plan` names
it. Needs numpy only: argparse, not absl, so it runs where only numpy and
`ai-edge-litert` are installed. A refused file prints one line and exits
1, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from km_tf.deploy.applier import apply_pack_files
from km_tf.errors import KMError


def main(argv: list[str] | None = None) -> int:
    """Runs the program; returns its exit status."""
    parser = argparse.ArgumentParser(prog="km-apply-pack",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("template", help="The template .tflite.")
    parser.add_argument("pack", help="The task's .kmpack.")
    parser.add_argument("output", help="The task .tflite to write.")
    parser.add_argument("--plan", help="The template's .kmplan (default: "
                        "next to the template).")
    args = parser.parse_args(argv)
    plan = args.plan or str(Path(args.template).with_suffix(".kmplan"))
    try:
        path = apply_pack_files(args.template, plan, args.pack, args.output)
    except (KMError, OSError) as error:
        print(f"km-apply-pack: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {path} ({path.stat().st_size:,} bytes).")
    return 0


def run() -> None:
    """The `km-apply-pack` console program."""
    sys.exit(main())


if __name__ == "__main__":
    run()
