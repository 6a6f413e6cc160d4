"""``megatron-hybrid sft`` / ``megatron-hybrid grpo``: post-train one mode on your own data.

Run::

    megatron-hybrid grpo --data my.jsonl --prompt-field q --answer-field a --mode hybrid
    megatron-hybrid sft --data train.parquet --mode lora sft.steps=200
    torchrun --nproc_per_node 2 -m megatron_hybrid.cli grpo --data my.jsonl parallel.tensor_model_parallel_size=2

Rows need a prompt and an answer (an integer, or a math expression with ``grpo.grpo.reward=math``).
A held-out fraction of the rows is used for the final greedy accuracy, graded in both stages with
``grpo.grpo.reward`` and at most ``grpo.grpo.sampling.max_new_tokens`` generated tokens. Every
row is checked before training: its answer must suit the reward, it must fit ``seq_length``, and
its answer (plus the end token) must fit ``max_new_tokens``. The model starts from random weights
unless ``init_checkpoint`` points to a Megatron checkpoint (base or merged). With ``save=true``
(the default) the result is saved to ``<out>/checkpoint``: a trainables checkpoint (LoRA A/B and
the FFT modules, the plan) on top of ``init_checkpoint`` or of the random start saved to
``<out>/checkpoint/base``, which ``megatron-hybrid merge`` and ``export-peft`` read; a merged
checkpoint can start the next stage (``init_checkpoint=...``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch.distributed as dist

from megatron_hybrid.config import check_int
from megatron_hybrid.data.arith import CharTokenizer
from megatron_hybrid.data.datasets import DataConfig, PromptDataset, load_prompt_datasets
from megatron_hybrid.data.tokenizers import CHAR_ALPHABET_KEY, build_tokenizer
from megatron_hybrid.demo.config import (
    MODES,
    DemoConfig,
    GRPOStageConfig,
    SFTStageConfig,
    StartConfig,
)
from megatron_hybrid.fileio import atomic_write_text
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.rl.rewards import get_reward_function
from megatron_hybrid.runtime.distributed import (
    ParallelConfig,
    destroy_runtime,
    initialize_runtime,
    on_rank0,
)
from megatron_hybrid.scoring.plan_io import save_plan
from megatron_hybrid.scoring.run import ScoreConfig
from megatron_hybrid.scoring.selection import SelectionConfig

__all__ = ["PostTrainConfig", "run_posttrain"]


@dataclass
class PostTrainConfig:
    """One mode, one seed, on a local dataset."""

    data: DataConfig | None = None
    """The dataset (``--data``, ``--prompt-field``, ``--answer-field``); set ``holdout_fraction``."""
    tokenizer: str = "char:auto"
    """``char`` (arithmetic alphabet), ``char:auto`` (the arithmetic alphabet, same ids, plus the
    data's other characters) or a local HF tokenizer directory. Saved checkpoints record a
    character alphabet; from an ``init_checkpoint`` that records one, ``char:auto`` reuses it (and
    refuses data with characters it lacks), so every id keeps its meaning."""
    chat_template: bool = False
    """HF tokenizers: write each prompt as a user turn of the tokenizer's chat template (for
    instruct models); false encodes the prompt with the tokenizer's own special tokens (BOS)."""
    mode: str = "hybrid"
    """One of fft, lora, hybrid, hybrid-random, hybrid-gradnorm."""
    seed: int = 0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(max_sequence_length=64))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=4, alpha=8.0))
    select: SelectionConfig = field(default_factory=SelectionConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    sft: SFTStageConfig = field(default_factory=lambda: SFTStageConfig(steps=200, eval_interval=50))
    grpo: GRPOStageConfig = field(
        default_factory=lambda: GRPOStageConfig(
            steps=50, eval_interval=10, start=StartConfig(target_accuracy=0.0)
        )
    )
    seq_length: int = 64
    init_checkpoint: str | None = None
    """A base or merged checkpoint (``convert-hf`` or ``merge`` output) to start from; its
    architecture is used unless ``model.*`` is set. None starts from random weights."""
    out: str | None = None
    """Output directory (``--out``); None: ``runs/sft`` or ``runs/grpo``. One that already holds
    files is refused unless ``overwrite``."""
    overwrite: bool = False
    """Reuse an ``out`` that holds an earlier run: its ``checkpoint/``, ``tensorboard/``,
    ``result.json`` and ``plan.json`` are deleted first, so the new run's files never mix with the
    old (other files are left alone). Refused when ``init_checkpoint`` lies inside ``out``."""
    save: bool = True
    """Save the trained weights to ``<out>/checkpoint`` (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        check_int("seed", self.seed, minimum=0)
        for key in ("save", "overwrite", "chat_template"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.data is None:
            raise ValueError("data.path is required (--data FILE)")
        if self.data.holdout_fraction is None:
            self.data.holdout_fraction = 0.1
        elif self.data.holdout_fraction == 0:
            raise ValueError(
                "data.holdout_fraction=0 leaves no rows to evaluate on; the job reports held-out "
                "accuracy, so hold out a fraction in (0, 1) (default 0.1)"
            )
        if self.score.objective != "nll":
            raise ValueError(
                f"score.objective={self.score.objective!r}: sft / grpo score the modules with the "
                "next-token loss on your rows (nll); policy_gradient is for megatron-hybrid score"
            )
        if self.grpo.start.enabled:
            raise ValueError(
                "grpo.start.target_accuracy is the embedded benchmark's half-trained start; "
                "on your data, start from a checkpoint instead (init_checkpoint=DIR)"
            )


def run_posttrain(cfg: PostTrainConfig, stage: str, *, printer=print) -> dict:
    """Train ``cfg.mode`` with ``stage`` (``sft`` or ``grpo``); writes ``<out>/result.json``."""
    from megatron_hybrid.demo.runner import Demo, ProblemSet

    if stage not in ("sft", "grpo"):
        raise ValueError(f"stage must be 'sft' or 'grpo', got {stage!r}")
    if cfg.out is None:
        cfg = replace(cfg, out=f"runs/{stage}")
    _check_out(Path(cfg.out), cfg.overwrite)
    if cfg.overwrite and cfg.init_checkpoint:
        start, out = Path(cfg.init_checkpoint).resolve(), Path(cfg.out).resolve()
        if start == out or out in start.parents:
            raise ValueError(
                f"init_checkpoint {cfg.init_checkpoint} lies inside out={cfg.out}, which "
                "overwrite=true would delete first; write this run to another --out"
            )
    train, holdout = load_prompt_datasets(cfg.data)
    if holdout is None or len(holdout) == 0:
        raise ValueError("data.holdout_fraction must leave some rows for evaluation")
    pairs = [train[i] for i in range(len(train))]
    test = [holdout[i] for i in range(len(holdout))]
    _check_reserved_characters(cfg, train, holdout)
    init = _init_meta(cfg)
    tok = build_tokenizer(
        cfg.tokenizer,
        (t for pair in pairs + test for t in pair),
        recorded=None if init is None else init.details.get(CHAR_ALPHABET_KEY),
        source=f"init_checkpoint {cfg.init_checkpoint}",
        chat_template=cfg.chat_template,
    )
    cfg = replace(cfg, model=_model_config(cfg, init, tok))  # result.json records the model used
    _check_rows(cfg, tok, train, holdout)
    model = cfg.model
    demo_cfg = DemoConfig(
        model=model,
        parallel=cfg.parallel,
        lora=cfg.lora,
        select=cfg.select,
        score=cfg.score,
        sft=cfg.sft,
        grpo=cfg.grpo,
        modes=[cfg.mode],
        seeds=[cfg.seed],
        seq_length=cfg.seq_length,
        out=cfg.out,
        tensorboard=True,
    )
    demo_cfg.sft.eval_subset = min(demo_cfg.sft.eval_subset, len(test))
    demo_cfg.grpo.eval_subset = min(demo_cfg.grpo.eval_subset, len(test))
    initialize_runtime(cfg.parallel, seed=cfg.seed)
    try:
        if cfg.overwrite:
            on_rank0(lambda: _clear_earlier_run(Path(cfg.out)))
        rank0 = dist.get_rank() == 0
        say = printer if rank0 else (lambda *_a, **_k: None)
        demo = Demo(demo_cfg, say, tokenizer=tok)
        demo.log_progress = True
        if cfg.init_checkpoint:
            demo.base_state = _load_init_checkpoint(cfg, demo)
        else:
            say(
                "no init_checkpoint: training from random weights, with embeddings, norms and "
                "the output layer frozen as in every mode; to post-train a model, pass "
                "init_checkpoint=DIR (convert-hf or merge output)"
            )
        problems = ProblemSet(train=pairs, val=[], test=test)
        say(
            f"{stage} / {cfg.mode} on {cfg.data.path}: {len(pairs)} training rows, {len(test)} held out"
        )
        table = demo.score_table(problems, stage) if cfg.mode.startswith("hybrid") else {}
        if not table:
            table = _candidate_table(demo)
        plan = demo.plan_for(cfg.mode, table, cfg.seed)
        if cfg.mode.startswith("hybrid"):
            artifact = _plan_artifact(cfg, demo_cfg.model, table, plan, stage)
            plan_path = on_rank0(lambda: save_plan(artifact, Path(cfg.out) / "plan.json"))
            say(
                f"plan ({cfg.mode}): FFT {', '.join(artifact.fft_names())}; written to "
                f"{plan_path} (megatron-hybrid plan show {plan_path})"
            )
        result = demo.run(
            stage,
            cfg.mode,
            cfg.seed,
            problems,
            plan,
            getattr(demo_cfg, stage).modes[cfg.mode],
            save_dir=Path(cfg.out) / "checkpoint" if cfg.save else None,
            base_checkpoint=cfg.init_checkpoint,
        )
        if result.reward_errors or result.reward_timeouts:
            say(
                f"warning: the reward function failed on {result.reward_errors} completions and "
                f"timed out on {result.reward_timeouts} (each scored 0)"
                + (
                    f"; first error: {result.reward_first_error}"
                    if result.reward_first_error
                    else ""
                )
            )
        out = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "result": asdict(result)}
        if rank0:
            path = Path(cfg.out)
            atomic_write_text(path / "result.json", json.dumps(out, indent=1) + "\n")
            say(
                f"held-out accuracy {result.final_heldout_accuracy:.3f} ({result.wall_time_s:.0f} s); "
                f"trainable parameters {result.trainable_params:,}; wrote {path / 'result.json'}"
                + (f" and the weights to {result.checkpoint}" if result.checkpoint else "")
            )
        return out
    finally:
        destroy_runtime()


def _plan_artifact(cfg: PostTrainConfig, model: ModelConfig, table, plan, stage: str):
    """The run's plan as the artifact ``megatron-hybrid score`` writes: every candidate's scores
    on the run's data at its start, and the decision the mode made."""
    from megatron_hybrid.scoring.plan_io import (
        ModuleEntry,
        PlanArtifact,
        layout_record,
        model_fingerprint,
    )
    from megatron_hybrid.scoring.run import describe, seeded_uniform

    method = {"hybrid-gradnorm": "grad_norm", "hybrid-random": "random"}.get(
        cfg.mode, cfg.score.method
    )
    entries = [
        ModuleEntry(
            name=name,
            kind=info["kind"],
            shape=list(info["shape"]),
            params=info["params"],
            scores={k: v for k, v in info.items() if k not in ("params", "kind", "shape")}
            | ({"random": seeded_uniform(name, cfg.seed)} if method == "random" else {}),
            decision=plan.modules[name].mode,
            rank=None if plan.modules[name].mode == "fft" else cfg.lora.rank,
        )
        for name, info in sorted(table.items())
    ]
    return PlanArtifact(
        model=model_fingerprint(model),
        budget=asdict(cfg.select),
        score=describe(cfg.score)
        | {"method": method, "objective": "nll", "rank": cfg.score.rank or cfg.lora.rank},
        calibration={
            "objective": "nll",
            "data": str(cfg.data.path),
            "stage": stage,
            "start": cfg.init_checkpoint or "random weights",
            "layout": layout_record(cfg.parallel),
        },
        lora=asdict(cfg.lora),
        modules=entries,
        seed=cfg.seed,
    )


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output directory holding files (an earlier run's checkpoint would otherwise be
    rewritten under it and its ``result.json`` replaced) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out={out} already holds files (an earlier run?); choose another --out or pass "
            "overwrite=true to replace its result, checkpoint and TensorBoard logs"
        )


def _clear_earlier_run(out: Path) -> None:
    for name in ("checkpoint", "tensorboard"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("result.json", "plan.json"):
        (out / name).unlink(missing_ok=True)


def _check_reserved_characters(cfg: PostTrainConfig, *parts: PromptDataset) -> None:
    """The character tokenizers reserve ``_`` (padding) and ``$`` (end): name the first row that
    uses one."""
    if not cfg.tokenizer.startswith("char"):
        return
    for part in parts:
        for (prompt, answer), origin in zip(part, part.origins):
            for field_name, text in (("prompt", prompt), ("answer", answer)):
                hit = CharTokenizer.reserved_in(text)
                if hit is not None:
                    raise ValueError(
                        f"{origin}: the {field_name} {text!r:.80} contains {hit!r}, which the "
                        f"character tokenizer reserves (padding / end); use a Hugging Face "
                        "tokenizer (tokenizer=/path/to/tokenizer)"
                    )


def _check_rows(cfg: PostTrainConfig, tok, *parts: PromptDataset) -> None:
    """Every row, before training: it tokenizes to a nonempty prompt, its answer suits the reward
    (the reward function must accept the answer itself as a completion), the row fits
    ``seq_length``, the answer plus the end token fits the generation limit used for rollouts and
    evaluation, and with learned absolute positions a rollout fits ``model.max_sequence_length``."""
    reward_name = cfg.grpo.grpo.reward
    reward = get_reward_function(reward_name)
    limit = cfg.grpo.grpo.sampling.max_new_tokens
    tp = cfg.parallel.tensor_model_parallel_size
    learned_positions = cfg.model.position_embedding_type == "learned_absolute"
    for part in parts:
        for (prompt, answer), origin in zip(part, part.origins):
            try:
                reward(answer, answer)
            except Exception as e:  # noqa: BLE001 - any failure means the rows do not suit it
                raise ValueError(
                    f"{origin}: answer {answer!r:.80} does not suit grpo.grpo.reward="
                    f"{reward_name!r} ({e}); integer rewards need integer answers, "
                    "grpo.grpo.reward=math grades math answers"
                ) from None
            try:
                n_prompt, n_answer = len(tok.encode_prompt(prompt)), len(tok.encode(answer)) + 1
            except Exception as e:  # noqa: BLE001 - name the row whatever the tokenizer raises
                raise ValueError(f"{origin}: cannot tokenize the row: {e}") from None
            if n_prompt == 0:
                raise ValueError(f"{origin}: the prompt {prompt!r:.80} has no tokens")
            need = n_prompt + n_answer - 1  # inputs of prompt + answer + end (make_sft_batch)
            if need > cfg.seq_length:
                raise ValueError(
                    f"{origin}: prompt + answer need {need} tokens > "
                    f"seq_length={cfg.seq_length} (raise seq_length and "
                    "model.max_sequence_length)"
                )
            if n_answer > limit:
                raise ValueError(
                    f"{origin}: the answer needs {n_answer} tokens with the end token > "
                    f"grpo.grpo.sampling.max_new_tokens={limit}, the generation limit of the "
                    f"rollouts and the held-out evaluation; set it to at least {n_answer}"
                )
            width = -(-(n_prompt + limit - 1) // tp) * tp  # the widest input a rollout feeds
            if learned_positions and width > cfg.model.max_sequence_length:
                raise ValueError(
                    f"{origin}: a rollout of the prompt ({n_prompt} tokens) with up to "
                    f"grpo.grpo.sampling.max_new_tokens={limit} new tokens feeds {width} "
                    f"positions > model.max_sequence_length={cfg.model.max_sequence_length}, "
                    "where learned absolute position embeddings end"
                )


def _candidate_table(demo) -> dict[str, dict]:
    """Candidate names and sizes without scoring (fft / lora modes)."""
    from megatron.core import parallel_state

    from megatron_hybrid.scoring.run import local_candidates

    chunks = demo.fresh_model()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for ref in local_candidates(chunks):
        out_l, in_l = ref.module.weight.shape
        local[ref.name] = {"params": out_l * in_l * tp}  # one dimension is sharded either way
    gathered: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(
        gathered, local, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return {k: v for part in gathered for k, v in part.items()}


def _init_meta(cfg: PostTrainConfig):
    """The ``init_checkpoint``'s metadata (None without one); refuses an HF model with a
    character tokenizer, which would read its ids as characters."""
    if not cfg.init_checkpoint:
        return None
    from megatron_hybrid.checkpoint.commit import resolve_checkpoint
    from megatron_hybrid.checkpoint.metadata import read_meta

    meta = read_meta(resolve_checkpoint(cfg.init_checkpoint))
    if meta.hf and cfg.tokenizer.startswith("char"):
        arch = meta.hf.get("architecture", "an HF model")
        raise ValueError(
            f"init_checkpoint {cfg.init_checkpoint} was converted from {arch}; train it with its "
            f"own tokenizer (tokenizer=/path/to/the/hf/model), not tokenizer={cfg.tokenizer}"
        )
    return meta


def _model_config(cfg: PostTrainConfig, init, tok) -> ModelConfig:
    """The model: the ``init_checkpoint``'s architecture with the ``model.*`` keys that were set
    (those that differ from the defaults) on top, checked against the checkpoint when it loads;
    without a checkpoint, ``cfg.model`` with a vocabulary large enough for the tokenizer."""
    model = cfg.model
    if init is not None:
        default = asdict(PostTrainConfig.__dataclass_fields__["model"].default_factory())
        given = {k: v for k, v in asdict(model).items() if v != default[k]}
        saved = init.model_config()
        model = replace(saved, **given)
        if model.vocab_size < tok.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} tokens, more than the vocabulary of "
                f"init_checkpoint {cfg.init_checkpoint} ({saved.vocab_size})"
                if "vocab_size" not in given
                else f"the tokenizer has {tok.vocab_size} tokens > model.vocab_size={model.vocab_size}"
            )
        return model
    if model.vocab_size < tok.vocab_size:
        model = replace(model, vocab_size=tok.vocab_size)
    return model


def _load_init_checkpoint(cfg: PostTrainConfig, demo) -> list[dict]:
    """Local state dicts of the base model from a Megatron checkpoint (``convert-hf`` output)."""
    from megatron_hybrid.checkpoint import load_model

    chunks = demo.fresh_model()
    load_model(cfg.init_checkpoint, chunks, demo.cfg.model)
    return [
        {k: v.detach().clone() for k, v in c.state_dict().items() if not k.endswith("_extra_state")}
        for c in chunks
    ]
