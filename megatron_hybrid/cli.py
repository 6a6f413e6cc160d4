"""``megatron-hybrid`` command line.

Subcommands take ``--config FILE.yaml`` plus ``key.sub=value`` overrides and run as one process or
under ``torchrun`` (``torchrun --nproc_per_node N -m megatron_hybrid.cli <subcommand> ...``).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from megatron_hybrid.config import load_config
    from megatron_hybrid.train.quickstart import QuickstartConfig, run_quickstart

    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    run_quickstart(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-hybrid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train the tiny model a few steps with a hybrid plan (FFT + LoRA) on the built-in task",
    )
    train.add_argument("--config", help="YAML file of overrides (see examples/)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.steps=10")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"megatron-hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
