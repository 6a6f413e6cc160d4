"""Which modules to fully fine-tune: forced module sets vs the benchmark's modes, on VALIDATION.

Trains one stage of the embedded benchmark (``megatron-hybrid demo``; ``--stage sft``, the default,
or ``grpo``) once per (set, seed) and
prints the validation accuracy per seed and the mean, so that a selection rule can be judged on
seeds the test runs never used (a validation run and a test run with the same seed are the same
training run: choosing on the test seeds repairs those seeds, not new ones). The test split is
never evaluated.

Each ``--set`` is ``NAME=MODULES``: MODULES is ``fft``, ``lora``, a hybrid mode (``hybrid``,
``hybrid-random``, ``hybrid-gradnorm``: the benchmark's own selection) or a comma-separated list of
modules to fully fine-tune, LoRA on the rest, with the ``hybrid`` mode's learning rates (``L0.qkv``
is short for ``decoder.layers.0.self_attention.linear_qkv``; ``proj``, ``fc1``, ``fc2`` likewise).

Run (CPU; the base model is warmed up once and cached in ``cache_dir``)::

    python scripts/demo_module_sets.py --seeds 5,6,7,8,9 \\
        --set fft=fft --set lora=lora --set residual=hybrid --set random=hybrid-random \\
        --set "epd=L0.qkv,L0.proj" --set "fc2+proj=L0.fc2,L0.proj" --out runs/module_sets

Trailing ``key=value`` arguments override the benchmark config (``sft.steps=900``, ...);
``--quick`` applies the ``--quick`` preset (a smoke test). Writes ``<out>/module_sets.json``.
GRPO on the SFT stage's new operation, for instance::

    python scripts/demo_module_sets.py --stage grpo --seeds 0,1 --set fft=fft --set lora=lora \
        grpo.task.op=# grpo.task.symbol=- grpo.task.min_digits=1 grpo.task.max_digits=3

and the same from a half-trained start (``--start-accuracy 0.3``: the base is first fine-tuned on
the SFT stage's data until 30% of the SFT validation prompts are right, then every run starts
there)::

    python scripts/demo_module_sets.py --stage grpo --seeds 0,1,2,3,4 --start-accuracy 0.3 \
        --set fft=fft --set lora=lora --set residual=hybrid grpo.steps=100 \
        grpo.task.op=# grpo.task.symbol=- grpo.task.min_digits=1 grpo.task.max_digits=3
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_hybrid.config import load_config, parse_number_list
from megatron_hybrid.demo.config import MODES, DemoConfig, quick_overrides
from megatron_hybrid.demo.pool import resolve_workers, run_jobs
from megatron_hybrid.demo.runner import Demo, make_problem_set, stage_optim
from megatron_hybrid.fileio import atomic_write_text
from megatron_hybrid.peft.plan import HybridPlan, ModuleDecision
from megatron_hybrid.runtime.distributed import destroy_runtime, initialize_runtime
from megatron_hybrid.train.step import (
    build_optimizer,
    lm_forward_backward,
    set_learning_rate,
    wrap_ddp,
)

_KINDS = {
    "qkv": "self_attention.linear_qkv",
    "proj": "self_attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}


def module_name(short: str, candidates: list[str]) -> str:
    """``L0.qkv`` -> ``decoder.layers.0.self_attention.linear_qkv`` (full names pass through)."""
    name = short
    layer, _, kind = short.partition(".")
    if layer[:1] == "L" and layer[1:].isdigit() and kind in _KINDS:
        name = f"decoder.layers.{int(layer[1:])}.{_KINDS[kind]}"
    if name not in candidates:
        raise ValueError(
            f"unknown module {short!r}; candidates: {', '.join(candidates)} (or L<layer>.qkv|proj|fc1|fc2)"
        )
    return name


def parse_sets(specs: list[str], candidates: list[str]) -> dict[str, str | list[str]]:
    """``NAME=MODULES`` specs -> name -> a mode, or the list of modules to fully fine-tune."""
    out: dict[str, str | list[str]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--set {spec!r}: expected NAME=MODULES")
        if name in out:
            raise ValueError(f"--set {spec!r}: name {name!r} given twice")
        out[name] = (
            value
            if value in MODES
            else sorted({module_name(m.strip(), candidates) for m in value.split(",")})
        )
    return out


def start_from_partial_sft(
    demo: Demo, target: float, check_every: int = 20, check_prompts: int = 100
) -> tuple[int, float]:
    """Replace the base of every run by a half-trained model (``--start-accuracy``).

    Fine-tunes all weights of the base on the SFT stage's training split, with the SFT stage's
    ``fft`` learning rate and schedule, and stops at the first check (greedy accuracy on the first
    ``check_prompts`` prompts of the SFT stage's validation split, every ``check_every`` steps)
    that reaches ``target``, or at the end of the schedule. Prompts held out by the GRPO stage
    (its validation and test splits) are removed from the training data first. The weights are
    saved under ``cfg.out`` so that worker processes start from them too.

    Returns ``(steps trained, accuracy at the last check)``.
    """
    cfg = demo.cfg
    sft = make_problem_set(cfg.sft.task, cfg.sft.test_size, cfg.sft.val_size)
    rl = make_problem_set(cfg.grpo.task, cfg.grpo.test_size, cfg.grpo.val_size)
    held = {prompt for prompt, _ in rl.val + rl.test}
    train = [pair for pair in sft.train if pair[0] not in held]
    check = sft.val[:check_prompts]
    torch.manual_seed(0)
    ddp = wrap_ddp(demo.fresh_model())
    optim = stage_optim("sft", cfg.sft, cfg.sft.modes["fft"])
    opt = build_optimizer(ddp, optim)
    draw = demo.sft_batches(train, cfg.sft.batch_size, seed=31_337)
    step, acc = 0, 0.0
    while step < cfg.sft.steps:
        set_learning_rate(opt, optim, step, cfg.sft.steps)
        lm_forward_backward(ddp, draw())
        ok, _, _ = opt.step()
        step += 1
        if not ok:
            raise RuntimeError(f"--start-accuracy: SFT step {step}: non-finite gradients")
        if step % check_every == 0 or step == cfg.sft.steps:
            acc = demo.accuracy(ddp, check)
            if acc >= target:
                break
    mp_rank = parallel_state.get_model_parallel_group().rank()
    demo.set_base(ddp, Path(cfg.out) / f"start-base-mp{mp_rank}.pt")
    demo.say(
        f"start: the base after {step} SFT steps (all weights), "
        f"accuracy {acc:.3f} on {len(check)} SFT validation prompts"
    )
    return step, acc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("sft", "grpo"), default="sft")
    ap.add_argument("--seeds", required=True, help="comma-separated training seeds, e.g. 5,6,7,8,9")
    ap.add_argument("--set", dest="sets", action="append", required=True, metavar="NAME=MODULES")
    ap.add_argument("--out", default="runs/module_sets")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick preset (smoke test)")
    ap.add_argument(
        "--start-accuracy",
        type=float,
        metavar="A",
        help="(--stage grpo) start every run from the base fine-tuned on the SFT stage's data "
        "until its validation accuracy reaches A (a half-trained start for RL)",
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark config")
    args = ap.parse_args(argv)
    try:
        seeds = parse_number_list("--seeds", args.seeds, int)
    except ValueError as e:
        ap.error(str(e))
    if args.start_accuracy is not None:
        if args.stage != "grpo":
            ap.error("--start-accuracy needs --stage grpo")
        if not 0.0 < args.start_accuracy <= 1.0:
            ap.error(f"--start-accuracy must be in (0, 1], got {args.start_accuracy}")
    overrides = (quick_overrides() if args.quick else []) + [f"out={args.out}", *args.overrides]
    cfg = load_config(DemoConfig, None, overrides)

    initialize_runtime(cfg.parallel, seed=1234)
    try:
        demo = Demo(cfg, print)
        demo.warm_up()
        start = None
        if args.start_accuracy is not None:
            steps, acc = start_from_partial_sft(demo, args.start_accuracy)
            start = {"target_accuracy": args.start_accuracy, "sft_steps": steps, "accuracy": acc}
        on_val, table = demo.validation_stage(args.stage)
        candidates = sorted(table)
        sets = parse_sets(args.sets, candidates)
        jobs, meta = [], []
        for name, what in sets.items():
            for seed in seeds:
                if isinstance(what, str):
                    mode, plan = what, demo.plan_for(what, table, seed)
                else:
                    mode = "hybrid"
                    plan = HybridPlan(
                        {n: ModuleDecision("fft" if n in what else "lora") for n in candidates},
                        lora=cfg.lora,
                        seed=seed,
                    )
                modes = getattr(cfg, args.stage).modes
                jobs.append((args.stage, mode, seed, on_val, plan, replace(modes[mode])))
                meta.append((name, seed))
        found: dict[str, dict[int, float]] = {name: {} for name in sets}
        picked: dict[str, dict[int, list[str]]] = {name: {} for name in sets}

        def on_result(i: int, res) -> None:
            name, seed = meta[i]
            found[name][seed] = res.final_heldout_accuracy
            picked[name][seed] = res.fft_modules
            print(f"  {name:24s} seed {seed}: validation accuracy {res.final_heldout_accuracy:.3f}")

        run_jobs(demo, jobs, resolve_workers(cfg.workers, len(jobs)), on_result)
        print(f"\n| set | FFT modules | mean | {' | '.join(f'seed {s}' for s in seeds)} |")
        print("| --- | --- | --- |" + " --- |" * len(seeds))
        for name in sets:
            accs = [found[name][s] for s in seeds]
            mods = {", ".join(picked[name][s]) or "all/none" for s in seeds}
            print(
                f"| {name} | {'; '.join(sorted(mods)) if len(mods) == 1 else 'per seed'} | "
                f"{statistics.fmean(accs):.3f} | " + " | ".join(f"{a:.3f}" for a in accs) + " |"
            )
        result = {
            "seeds": seeds,
            "stage": args.stage,
            "split": "validation",
            "start": start,
            "sets": {
                name: {
                    "accuracy": {str(s): found[name][s] for s in seeds},
                    "fft_modules": {str(s): picked[name][s] for s in seeds},
                    "mean": statistics.fmean(found[name][s] for s in seeds),
                }
                for name in sets
            },
        }
        path = Path(cfg.out) / "module_sets.json"
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        print(f"written to {path}")
        return result
    finally:
        destroy_runtime()


if __name__ == "__main__":
    main()
