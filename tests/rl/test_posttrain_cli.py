"""``megatron-hybrid sft|grpo --data FILE``: post-training one mode on a user's jsonl, end to end.

A tiny model on small local files (integer answers; ``\\boxed{}`` math answers with the ``math``
reward), every mode for SFT; checks ``result.json`` and that bad rows fail before training with
the file, row and field named.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.multirank import REPO_ROOT, child_env

TINY = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=64",
]
MODES = ["fft", "lora", "hybrid", "hybrid-random", "hybrid-gradnorm"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_hybrid.cli", *args],
        cwd=REPO_ROOT,
        env=child_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("posttrain")
    with open(root / "sums.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"q": f"{i}+{i % 7}=", "a": i + i % 7}) + "\n")
    with open(root / "math.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"{i} plus 2?", "solution": f"\\boxed{{{i + 2}}}"}))
            f.write("\n")
    return root


def _result(proc: subprocess.CompletedProcess, out) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())["result"]


@pytest.fixture(scope="module")
def sft_results(data):
    results = {}
    for mode in MODES:
        out = data / f"sft_{mode}"
        proc = _cli(
            "sft", "--data", str(data / "sums.jsonl"), "--prompt-field", "q",
            "--answer-field", "a", "--mode", mode, "--out", str(out), *TINY,
            "sft.steps=3", "sft.eval_interval=2", "sft.batch_size=8", "sft.clip_grad=1.0",
            "score.probe.steps=2",
        )  # fmt: skip
        results[mode] = _result(proc, out)
    return results


def test_sft_runs_every_mode_on_a_jsonl(sft_results):
    for mode, r in sft_results.items():
        assert (r["mode"], r["stage"]) == (mode, "sft")
        assert 0.0 <= r["final_heldout_accuracy"] <= 1.0
        assert len(r["loss_curve"]) == 3
    params = {m: r["trainable_params"] for m, r in sft_results.items()}
    assert params["lora"] < params["hybrid"] < params["fft"]
    n_fft = {m: len(r["fft_modules"]) for m, r in sft_results.items()}
    # 2 layers x 4 candidates, budget 10% -> ceil(0.8) = 1 fully fine-tuned module
    assert n_fft["hybrid"] == n_fft["hybrid-random"] == n_fft["hybrid-gradnorm"] == 1
    assert n_fft["lora"] == 0


def test_hybrid_runs_write_the_plan_they_used(sft_results, data):
    """``<out>/plan.json``: the scores on the run's data and the run's decisions, readable by
    ``plan show`` / ``load_plan`` like the output of ``megatron-hybrid score``."""
    from megatron_hybrid.scoring.plan_io import load_plan

    for mode, method in (("hybrid", "residual"), ("hybrid-gradnorm", "grad_norm")):
        artifact = load_plan(data / f"sft_{mode}" / "plan.json")
        assert artifact.fft_names() == sft_results[mode]["fft_modules"]
        assert artifact.score["method"] == method
        best = max(artifact.modules, key=lambda m: m.scores[method])
        assert artifact.fft_names() == [best.name]  # budget: 1 module
        assert {m.decision for m in artifact.modules} == {"fft", "lora"}
    random_plan = load_plan(data / "sft_hybrid-random" / "plan.json")
    assert random_plan.score["method"] == "random"
    best = max(random_plan.modules, key=lambda m: m.scores["random"])  # what plan show draws
    assert random_plan.fft_names() == [best.name] == sft_results["hybrid-random"]["fft_modules"]
    assert not (data / "sft_lora" / "plan.json").exists()


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("hybrid", ["grpo.grpo.loss.loss=gspo", "grpo.clip_grad=1.0"]),
        ("lora", ["grpo.grpo.loss.loss=dr_grpo"]),
    ],
)
def test_grpo_with_math_answers_and_reward(data, mode, extra):
    out = data / f"grpo_{mode}"
    proc = _cli(
        "grpo", "--data", str(data / "math.jsonl"), "--prompt-field", "question",
        "--answer-field", "solution", "--mode", mode, "--out", str(out), *TINY,
        "grpo.steps=2", "grpo.eval_interval=1", "grpo.grpo.reward=math",
        "grpo.grpo.sampling.max_new_tokens=12",  # \boxed{41}$ is 11 characters
        "grpo.grpo.group_size=2", "grpo.grpo.prompts_per_step=4", "score.probe.steps=2", *extra,
    )  # fmt: skip
    r = _result(proc, out)
    assert (r["mode"], r["stage"]) == (mode, "grpo")
    assert [s for s, _ in r["reward_curve"]] == [1, 2]
    assert all(0.0 <= v <= 1.0 for _, v in r["reward_curve"])


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_local_hf_tokenizer_with_its_chat_template(data, stage):
    """The HF path end to end: prompts as chat turns, stop at eos or end of turn, integer rewards
    on decoded text (a tiny local tokenizer, tests/hf_tokenizer.py)."""
    from tests.hf_tokenizer import write_tokenizer

    tok_dir = data / "hf_tokenizer"
    if not tok_dir.exists():
        write_tokenizer(tok_dir)
    out = data / f"hf_{stage}"
    proc = _cli(
        stage, "--data", str(data / "sums.jsonl"), "--prompt-field", "q", "--answer-field", "a",
        "--mode", "hybrid", "--out", str(out), *TINY, f"tokenizer={tok_dir}", "chat_template=true",
        "sft.steps=3", "sft.eval_interval=3", "sft.batch_size=8", "grpo.steps=2",
        "grpo.eval_interval=2", "grpo.grpo.group_size=2", "grpo.grpo.prompts_per_step=4",
    )  # fmt: skip
    r = _result(proc, out)
    assert (r["mode"], r["stage"]) == ("hybrid", stage)
    assert 0.0 <= r["final_heldout_accuracy"] <= 1.0


def test_a_row_without_the_answer_field_fails_before_training(data):
    bad = data / "bad.jsonl"
    rows = [{"q": "1+1=", "a": 2}, {"q": "2+2=", "a": 4}, {"q": "3+3="}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = data / "bad_out"
    proc = _cli(
        "sft", "--data", str(bad), "--prompt-field", "q", "--answer-field", "a",
        "--out", str(out), *TINY,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "row 2" in proc.stderr and "'a'" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_the_benchmarks_grpo_start_is_refused_on_custom_data(data):
    """grpo.start trains on the embedded task; a job on the user's data names the key instead."""
    from megatron_hybrid.config import load_config
    from megatron_hybrid.rl.job import PostTrainConfig

    assert not load_config(PostTrainConfig, None, ["data.path=x.jsonl"]).grpo.start.enabled
    with pytest.raises(ValueError, match=r"grpo.start.target_accuracy .*init_checkpoint"):
        load_config(PostTrainConfig, None, ["data.path=x.jsonl", "grpo.start.target_accuracy=0.3"])


def test_holdout_fraction_defaults_to_a_tenth_and_an_explicit_zero_is_refused():
    """The job evaluates on the holdout: unset means 0.1, an explicit 0 is an error (it used to
    become 0.1 silently)."""
    from megatron_hybrid.config import load_config
    from megatron_hybrid.rl.job import PostTrainConfig

    def holdout(*overrides):
        cfg = load_config(PostTrainConfig, None, ["data.path=x.jsonl", *overrides])
        return cfg.data.holdout_fraction

    assert holdout() == 0.1
    assert holdout("data.holdout_fraction=0.25") == 0.25
    with pytest.raises(ValueError, match=r"data.holdout_fraction=0 leaves no rows to evaluate"):
        holdout("data.holdout_fraction=0")


def _bad_rows(data, name: str, rows: list[dict]):
    path = data / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("bad_row", "extra", "message"),
    [
        # Held-out accuracy would silently stay 0: the answer cannot be generated or graded.
        ({"q": "3+4=", "a": "seven"}, [], "does not suit grpo.grpo.reward='digit_partial'"),
        ({"q": "3+4=", "a": 1234567}, [], "needs 8 tokens with the end token > grpo.grpo.sampling"),
        ({"q": "1" * 70 + "=", "a": 7}, [], "need 72 tokens > seq_length=64"),
        ({"q": "x_1+1=", "a": 2}, [], "contains '_', which the character tokenizer reserves"),
        ({"q": "3+4=", "a": "\\boxed{7}"}, ["grpo.grpo.reward=exact_int"], "does not suit"),
        ({"q": "", "a": 7}, [], "the prompt '' has no tokens"),
        ({"q": "3+4=?", "a": 7}, ["tokenizer=char"], "cannot tokenize the row: character '?'"),
        (
            {"q": "1" * 59 + "=", "a": 7},
            ["model.position_embedding_type=learned_absolute"],
            "feeds 65 positions > model.max_sequence_length=64",
        ),
    ],
)
def test_rows_that_cannot_work_fail_before_training_with_their_row(data, bad_row, extra, message):
    rows = [{"q": f"{i}+1=", "a": i + 1} for i in range(5)]
    rows.insert(3, bad_row)
    path = _bad_rows(data, "rows", rows)
    out = data / "rows_out"
    proc = _cli(
        "sft", "--data", str(path), "--prompt-field", "q", "--answer-field", "a",
        "--out", str(out), *TINY, *extra,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{path}: row 3" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_the_saved_weights_merge_into_the_trained_model(data, single_rank_runtime):
    """``sft`` saves base + trainables; ``merge`` of them reproduces the run's held-out accuracy
    (1.0 on a constant answer, learned in 40 steps), while the saved base alone does not."""
    from megatron_hybrid.checkpoint import load_model
    from megatron_hybrid.checkpoint.commit import resolve_checkpoint
    from megatron_hybrid.checkpoint.metadata import read_meta
    from megatron_hybrid.config import load_config
    from megatron_hybrid.data.datasets import load_prompt_datasets
    from megatron_hybrid.data.tokenizers import build_tokenizer
    from megatron_hybrid.models.provider import build_model
    from megatron_hybrid.rl.evaluate import greedy_accuracy
    from megatron_hybrid.rl.job import PostTrainConfig

    path = _bad_rows(data, "const", [{"q": f"{i}?", "a": 7} for i in range(40)])
    out = data / "saved"
    args = ["--data", str(path), "--prompt-field", "q", "--answer-field", "a"]
    proc = _cli(
        "sft", *args, "--mode", "hybrid", "--out", str(out), *TINY, "sft.steps=40",
        "sft.batch_size=8", "sft.warmup_steps=5", "sft.eval_interval=20", "score.probe.steps=2",
    )  # fmt: skip
    result = _result(proc, out)
    assert result["final_heldout_accuracy"] == 1.0
    assert result["checkpoint"] == str(out / "checkpoint" / "iter_0000040")
    merged = data / "merged"
    proc = _cli("merge", "--trainables", str(out / "checkpoint"), "--out", str(merged))
    assert proc.returncode == 0, proc.stderr[-2000:]

    cfg = load_config(
        PostTrainConfig, None, [f"data.path={path}", "data.prompt_field=q", "data.answer_field=a"]
    )
    train, holdout = load_prompt_datasets(cfg.data)
    tok = build_tokenizer(
        "char:auto", (t for part in (train, holdout) for pair in part for t in pair)
    )
    pairs = [(tok.encode(p), a) for p, a in holdout]

    def accuracy(checkpoint) -> float:
        model_cfg = read_meta(resolve_checkpoint(checkpoint)).model_config()
        chunks = build_model(model_cfg, single_rank_runtime)
        load_model(checkpoint, chunks, model_cfg)
        return greedy_accuracy(
            chunks, pairs, decode=tok.decode, stop_token=tok.eos_id,
            vocab_size=tok.vocab_size, max_new_tokens=6,
        )  # fmt: skip

    assert accuracy(merged) == 1.0
    assert accuracy(out / "checkpoint" / "base") <= 0.5  # the untrained start (chance hits)
    # A run from the merged checkpoint takes its architecture (no model.* given) and alphabet.
    proc = _cli(
        "sft", *args, "--mode", "lora", "--out", str(data / "from_merged_ok"), "sft.steps=2",
        "sft.eval_interval=2", f"init_checkpoint={merged}",
    )  # fmt: skip
    assert _result(proc, data / "from_merged_ok")["final_heldout_accuracy"] == 1.0
    # The merged checkpoint records the alphabet; a run from it must give each character its id.
    assert read_meta(resolve_checkpoint(merged)).details["char_alphabet"] == tok.CHARS
    letters = _bad_rows(data, "letters", [{"q": f"x{i}?", "a": 7} for i in range(40)])
    proc = _cli(
        "sft", "--data", str(letters), "--prompt-field", "q", "--answer-field", "a",
        "--mode", "lora", "--out", str(data / "from_merged"), *TINY, f"init_checkpoint={merged}",
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"init_checkpoint {merged} was trained with the character alphabet" in proc.stderr
    assert "characters it lacks: ['x']" in proc.stderr


def test_an_out_holding_an_earlier_run_is_refused_unless_overwrite(data):
    out = data / "twice"
    args = ["sft", "--data", str(data / "sums.jsonl"), "--prompt-field", "q", "--answer-field", "a",
            "--mode", "lora", "--out", str(out), *TINY, "sft.batch_size=8", "sft.eval_interval=2"]  # fmt: skip
    _result(_cli(*args, "sft.steps=3"), out)
    assert (out / "checkpoint" / "iter_0000003").is_dir()
    again = _cli(*args, "sft.steps=2")
    assert again.returncode != 0
    assert f"out={out} already holds files" in again.stderr and "overwrite=true" in again.stderr
    assert (out / "checkpoint" / "iter_0000003").is_dir()  # untouched
    r = _result(_cli(*args, "sft.steps=2", "overwrite=true"), out)
    assert r["checkpoint"] == str(out / "checkpoint" / "iter_0000002")
    assert not (out / "checkpoint" / "iter_0000003").exists()  # the earlier run's, removed


def test_an_hf_model_is_refused_with_a_character_tokenizer(tmp_path, single_rank_runtime):
    from megatron_hybrid.checkpoint import save_model
    from megatron_hybrid.config import load_config
    from megatron_hybrid.models.config import ModelConfig
    from megatron_hybrid.models.provider import build_model
    from megatron_hybrid.rl.job import PostTrainConfig, _init_meta

    model = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32)
    chunks = build_model(model, single_rank_runtime)
    save_model(tmp_path / "hf_base", chunks, model, hf={"architecture": "LlamaForCausalLM"})
    cfg = load_config(
        PostTrainConfig, None, ["data.path=x.jsonl", f"init_checkpoint={tmp_path / 'hf_base'}"]
    )
    with pytest.raises(ValueError, match=r"converted from LlamaForCausalLM; train it with its own"):
        _init_meta(cfg)


def test_the_checkpoints_architecture_with_the_model_keys_that_were_set():
    from types import SimpleNamespace

    from megatron_hybrid.config import load_config
    from megatron_hybrid.data.arith import CharTokenizer
    from megatron_hybrid.models.config import ModelConfig
    from megatron_hybrid.rl.job import PostTrainConfig, _model_config

    saved = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32)
    init = SimpleNamespace(model_config=lambda: saved)
    cfg = load_config(
        PostTrainConfig,
        None,
        ["data.path=x.jsonl", "init_checkpoint=ckpt", "model.max_sequence_length=128"],
    )
    model = _model_config(cfg, init, CharTokenizer())
    assert (model.num_layers, model.hidden_size, model.vocab_size) == (2, 16, saved.vocab_size)
    assert model.max_sequence_length == 128  # the key that was set
    big = SimpleNamespace(vocab_size=saved.vocab_size + 1)
    with pytest.raises(
        ValueError,
        match=rf"more than the vocabulary of init_checkpoint ckpt \({saved.vocab_size}\)",
    ):
        _model_config(cfg, init, big)


def test_overwrite_is_refused_when_the_start_lies_inside_out(data):
    out = data / "inside"
    (out / "checkpoint" / "base").mkdir(parents=True)
    proc = _cli(
        "sft", "--data", str(data / "sums.jsonl"), "--prompt-field", "q", "--answer-field", "a",
        "--out", str(out), "overwrite=true", f"init_checkpoint={out / 'checkpoint' / 'base'}",
    )  # fmt: skip
    assert proc.returncode != 0 and "lies inside out=" in proc.stderr
    assert (out / "checkpoint" / "base").is_dir()
