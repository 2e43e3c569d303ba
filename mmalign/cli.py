"""The ``mmalign`` command: train, eval, shards, index and demo subcommands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: mmalign COMMAND [ARGS]

commands:
  train    train a model:            mmalign train [--config FILE] [key=value ...]
  eval     score a trained model:    mmalign eval --model RUN_DIR [key=value ...]

Run `mmalign COMMAND --help` for the options of a command.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from mmalign.train import main as train_main

        return train_main(rest)
    if command == "eval":
        from mmalign.evaluate import main as eval_main

        return eval_main(rest)
    sys.stderr.write(f"mmalign: unknown command {command!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
