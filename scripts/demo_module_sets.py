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
The GRPO stage starts from its half-trained start (``grpo.start``, made once and cached), for
instance::

    python scripts/demo_module_sets.py --stage grpo --seeds 5,6,7,8,9 \
        --set fft=fft --set lora=lora --set residual=hybrid [grpo.modes.lora.lr=3e-4 ...]

and from the warmed-up base itself with ``grpo.start.target_accuracy=0``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from megatron_hybrid.config import load_config, parse_number_list
from megatron_hybrid.demo.config import MODES, DemoConfig, quick_overrides
from megatron_hybrid.demo.pool import resolve_workers, run_jobs
from megatron_hybrid.demo.runner import Demo
from megatron_hybrid.fileio import atomic_write_text
from megatron_hybrid.peft.plan import HybridPlan, ModuleDecision
from megatron_hybrid.runtime.distributed import destroy_runtime, initialize_runtime

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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("sft", "grpo"), default="sft")
    ap.add_argument("--seeds", required=True, help="comma-separated training seeds, e.g. 5,6,7,8,9")
    ap.add_argument("--set", dest="sets", action="append", required=True, metavar="NAME=MODULES")
    ap.add_argument("--out", default="runs/module_sets")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick preset (smoke test)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark config")
    args = ap.parse_args(argv)
    try:
        seeds = parse_number_list("--seeds", args.seeds, int)
    except ValueError as e:
        ap.error(str(e))
    overrides = (quick_overrides() if args.quick else []) + [f"out={args.out}", *args.overrides]
    cfg = load_config(DemoConfig, None, overrides)

    initialize_runtime(cfg.parallel, seed=1234)
    try:
        demo = Demo(cfg, print)
        demo.warm_up()
        start = demo.prepare_start(args.stage)
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
