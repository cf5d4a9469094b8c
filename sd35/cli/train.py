"""``sd35 train --config cfg.toml [--flag value ...]``: the command-line entry of the trainer.

Usage::

    sd35 train --config lora.toml
    sd35 train --config lora.toml --learning-rate 5e-5 --max-steps 500 --output-dir runs/b
    sd35 train --model sd3.5_medium/ --data-dir imgs/ --output-dir runs/a --mode full --fsdp
    sd35 train --config lora.toml --resume latest
    torchrun --nproc_per_node 4 -m sd35.cli.train --config lora.toml  # multi-GPU (DDP; FSDP with --fsdp)

Every key of :class:`~sd35.train.config.TrainConfig` is a flag (``learning_rate`` -> ``--learning-rate``).
A user mistake prints one line ``sd35: error: ...`` and returns 2.
"""

from __future__ import annotations

import sys

from sd35.cli.errors import run_reporting_errors


def main_train(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (the arguments after ``train``), train, and return the exit code."""
    from sd35.train.config import build_parser, parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0

    def command() -> int:
        cfg = parse_config(argv)
        from sd35.train.trainer import train

        result = train(cfg)
        for path in result.outputs:
            print(path)
        return 0

    return run_reporting_errors(command)


if __name__ == "__main__":
    sys.exit(main_train())
