"""``megatron-hybrid`` command line.

Subcommands take ``--config FILE.yaml`` plus ``key.sub=value`` overrides and run as one process or
under ``torchrun`` (``torchrun --nproc_per_node N -m megatron_hybrid.cli <subcommand> ...``).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _flag(key: str, value: str) -> str:
    """A command-line flag as a ``key=value`` override whose value stays the string given: quoted
    (JSON is YAML), so that ``--data '*.jsonl'``, ``--out 2024``, ``--prompt-field on`` or a path
    holding `` #`` are not read as YAML syntax, a number, a boolean or a comment."""
    return f"{key}={json.dumps(value)}"


def _train(args: argparse.Namespace) -> int:
    from megatron_hybrid.config import load_config
    from megatron_hybrid.train.quickstart import QuickstartConfig, run_quickstart

    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    run_quickstart(cfg)
    return 0


def _score(args: argparse.Namespace) -> int:
    from megatron_hybrid.config import load_config
    from megatron_hybrid.scoring.job import ScoreJobConfig, run_score_job

    overrides = list(args.overrides) + ([_flag("out", args.out)] if args.out else [])
    cfg = load_config(ScoreJobConfig, args.config, overrides)
    run_score_job(cfg)
    return 0


def _plan_show(args: argparse.Namespace) -> int:
    from megatron_hybrid.scoring.plan_io import load_plan
    from megatron_hybrid.scoring.show import plan_heatmap, plan_table

    artifact = load_plan(args.plan)
    print(plan_table(artifact))
    if args.png:
        print(f"heatmap written to {plan_heatmap(artifact, args.png)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from megatron_hybrid.config import load_config, parse_number_list
    from megatron_hybrid.demo.config import DemoConfig, quick_overrides
    from megatron_hybrid.demo.runner import default_sweep_grid, run_demo, run_sweep

    overrides = (quick_overrides() if args.quick else []) + list(args.overrides)
    if args.out:
        overrides.append(_flag("out", args.out))
    sweep_flags = {
        "--lrs": args.lrs,
        "--lora-mults": args.lora_mults,
        "--sweep-seeds": args.sweep_seeds,
    }
    for flag, value in sweep_flags.items():
        if value is not None and not args.sweep:
            raise SystemExit(f"{flag} only applies with --sweep sft|grpo")
    lrs = parse_number_list("--lrs", args.lrs)
    mults = parse_number_list("--lora-mults", args.lora_mults)
    seeds = parse_number_list("--sweep-seeds", args.sweep_seeds, int)
    cfg = load_config(DemoConfig, args.config, overrides)
    if args.sweep:
        grid = default_sweep_grid(cfg, args.sweep, lrs, mults)
        run_sweep(cfg, args.sweep, grid, seeds=tuple(seeds or (0,)))
        return 0
    run_demo(cfg)
    return 0


def _posttrain(args: argparse.Namespace) -> int:
    from megatron_hybrid.config import load_config
    from megatron_hybrid.rl.job import PostTrainConfig, run_posttrain

    flags = {
        "data.path": args.data,
        "data.prompt_field": args.prompt_field,
        "data.answer_field": args.answer_field,
        "mode": args.mode,
        "out": args.out,
    }
    overrides = [_flag(k, v) for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(PostTrainConfig, args.config, overrides)
    run_posttrain(cfg, args.command)
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

    score = sub.add_parser(
        "score", help="score candidate modules (Hybrid-LoRA Score) and write a plan JSON"
    )
    score.add_argument("--config", help="YAML file of overrides (see examples/)")
    score.add_argument("--out", help="plan file to write (default: plan.json)")
    score.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. score.method=residual"
    )
    score.set_defaults(func=_score)

    demo = sub.add_parser(
        "demo",
        help="the embedded benchmark: FFT vs LoRA vs Hybrid-LoRA (SFT and GRPO stages, several seeds)",
    )
    demo.add_argument("--config", help="YAML file of overrides (see examples/demo.yaml)")
    demo.add_argument(
        "--quick", action="store_true", help="a few-minute smoke-test preset (1 seed, short stages)"
    )
    demo.add_argument("--out", help="output directory (default runs/demo)")
    demo.add_argument(
        "--sweep",
        choices=("sft", "grpo"),
        help="instead of the benchmark: sweep each mode's learning rates for this stage on the "
        "validation split and write <out>/sweep_<stage>.json",
    )
    demo.add_argument(
        "--lrs",
        help="comma-separated learning rates for --sweep (default: each mode's configured rate "
        "x 1/3, 1, 3)",
    )
    demo.add_argument(
        "--lora-mults",
        help="comma-separated adapter learning-rate multipliers for --sweep, crossed with the "
        "rates, for every mode with adapters (default: each mode's configured multiplier)",
    )
    demo.add_argument(
        "--sweep-seeds",
        help="comma-separated training seeds for --sweep; each point is trained once per seed and "
        "ranked by the mean (default: 0)",
    )
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. seeds=[0,1,2]")
    demo.set_defaults(func=_demo)

    epilog = (
        "Held-out accuracy (both stages) and the GRPO reward use grpo.grpo.reward: digit_partial "
        "(default; integer answers, partial credit per digit, exact match for the accuracy), "
        "exact_int, or math (\\boxed{} / plain math answers); at most "
        "grpo.grpo.sampling.max_new_tokens (default 6) tokens are generated. Rows are checked "
        "before training. tokenizer=char:auto (default) or a local HF tokenizer directory "
        "(chat_template=true: prompts as chat turns). Learning rates are per mode: "
        "sft.modes.<mode>.lr / lora_lr_mult (grpo.modes... for grpo). "
        "Defaults: score.method=residual, lora.rank=4 lora.alpha=8, "
        "seq_length=64, data.holdout_fraction=0.1. Only the linear modules train (embeddings, "
        "norms and head stay frozen in every mode). The weights are saved to <out>/checkpoint "
        "(save=false to skip) for `megatron-hybrid merge` / `export-peft`."
    )
    for stage, text, example in (
        (
            "sft",
            "supervised post-training of one mode on your data (prompt + reference answer)",
            "sft.steps=200",
        ),
        (
            "grpo",
            "GRPO/GSPO post-training of one mode on your data with a verifiable reward",
            "grpo.steps=20",
        ),
    ):
        p = sub.add_parser(stage, help=text, description=text, epilog=epilog)
        p.add_argument("--data", help="local jsonl / json / parquet file (or directory, or glob)")
        p.add_argument("--prompt-field", help="column holding the prompt (default: prompt)")
        p.add_argument(
            "--answer-field", help="column holding the reference answer (default: answer)"
        )
        p.add_argument(
            "--mode", help="fft, lora, hybrid, hybrid-random or hybrid-gradnorm (default hybrid)"
        )
        p.add_argument("--config", help="YAML file of overrides")
        p.add_argument(
            "--out",
            help=f"output directory (default runs/{stage}; one holding files is refused unless "
            "overwrite=true)",
        )
        p.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
        p.set_defaults(func=_posttrain)

    from megatron_hybrid.convert.cli import add_checkpoint_subcommands

    add_checkpoint_subcommands(sub)

    plan = sub.add_parser("plan", help="inspect plan files")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="table of modules, scores and decisions")
    show.add_argument("plan", help="plan JSON written by `megatron-hybrid score`")
    show.add_argument("--png", help="also write a layers x module-kinds heatmap to this PNG")
    show.set_defaults(func=_plan_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ConnectionError,
        FloatingPointError,
    ) as e:
        print(f"megatron-hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
