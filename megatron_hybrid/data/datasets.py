"""Prompt/answer datasets for RL from local json, jsonl or parquet files, or the Hugging Face hub.

Files are read with ``datasets.load_dataset("json" | "parquet", data_files=...)``, one file at a
time so that every problem is reported with its file and row. All rows are validated up front:
a training run should not die on row 90,000 of a bad file hours in.

:class:`PromptDataset` has the same ``sample(n, generator)`` as
:class:`~megatron_hybrid.data.arith.ArithTask`, so a trainer can take either as its task.
"""

from __future__ import annotations

import glob
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hybrid.config import check_number

__all__ = ["DataConfig", "PromptDataset", "load_prompt_datasets"]

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where the prompts and answers come from and how they are split."""

    path: str
    """A local ``.jsonl``/``.json``/``.parquet`` file, a directory holding such files (read in
    name order), a glob pattern, or else a hub dataset name (``owner/name``, needs network or the
    local hub cache)."""
    prompt_field: str = "prompt"
    """Column holding the prompt (a string or a number)."""
    answer_field: str = "answer"
    """Column holding the reference answer (a string or a number; converted to ``str``)."""
    prompt_template: str | None = None
    """``str.format`` template with one ``{prompt}`` field (double any literal braces), e.g.
    ``"Question: {prompt}\\nAnswer:"``; None uses the prompt as is."""
    subset: str | None = None
    """Hub dataset configuration (``load_dataset``'s ``name``, e.g. ``"main"`` for gsm8k)."""
    split: str = "train"
    """Hub split to read; local files form a single ``train`` split."""
    holdout_fraction: float | None = None
    """Fraction of rows held out as a test set (at least one row when > 0), in [0, 1). None: the
    consumer's default (no holdout for :func:`load_prompt_datasets`; 0.1 for the post-training
    job, which refuses an explicit 0 since it evaluates on the holdout)."""
    seed: int = 0
    """Seed of the train/holdout permutation."""
    cache_dir: str | None = None
    """``datasets`` cache directory; None uses ``HF_DATASETS_CACHE``."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path must be a non-empty string, got {self.path!r}")
        for name in ("prompt_field", "answer_field", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name} must be a non-empty string, got {value!r}")
        if self.prompt_template is not None:
            _check_template(self.prompt_template)
        if self.holdout_fraction is not None:
            check_number(
                "data.holdout_fraction", self.holdout_fraction, lambda f: 0 <= f < 1, "in [0, 1)"
            )
        if type(self.seed) is not int:
            raise ValueError(f"data.seed must be an integer, got {self.seed!r}")


def _check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"data.prompt_template {template!r} is not a format string: {e}") from None
    if fields != ["prompt"]:
        raise ValueError(
            f"data.prompt_template must contain exactly one '{{prompt}}' field (double literal "
            f"braces), got fields {fields} in {template!r}"
        )


class PromptDataset:
    """(prompt, answer) string pairs; the prompt template is already applied.

    ``dataset[i]`` is the i-th pair in file order; :meth:`sample` draws pairs with a
    ``torch.Generator``, so a seeded generator reproduces the draw.
    """

    def __init__(
        self,
        prompts: list[str],
        answers: list[str],
        *,
        source: str = "<memory>",
        origins: list[str] | None = None,
    ):
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        self.prompts = list(prompts)
        self.answers = list(answers)
        self.source = source
        self.origins = (
            list(origins)
            if origins is not None
            else [f"{source}: row {i}" for i in range(len(self))]
        )
        """Where each pair comes from, for messages: ``"<file>: row <i>"`` (row in its file)."""

    @classmethod
    def from_config(cls, cfg: DataConfig) -> PromptDataset:
        """All rows of ``cfg.path`` (every row validated), before any holdout split."""
        prompts: list[str] = []
        answers: list[str] = []
        origins: list[str] = []
        for name, table in _load_tables(cfg):
            p, a = _validated_rows(table, name, cfg)
            prompts += p
            answers += a
            origins += [f"{name}: row {i}" for i in range(len(p))]
        if not prompts:
            raise ValueError(f"data.path {cfg.path!r} holds no rows")
        if cfg.prompt_template is not None:
            prompts = [cfg.prompt_template.format(prompt=p) for p in prompts]
        return cls(prompts, answers, source=cfg.path, origins=origins)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.prompts[index], self.answers[index]

    def __repr__(self) -> str:
        return f"PromptDataset({len(self)} rows from {self.source!r})"

    def sample(
        self, n: int, generator: torch.Generator, *, replace: bool = False
    ) -> list[tuple[str, str]]:
        """``n`` random pairs; distinct rows unless ``replace`` (then ``n`` may exceed ``len``)."""
        if n < 0 or (not replace and n > len(self)):
            raise ValueError(
                f"cannot draw {n} distinct rows from {len(self)} (pass replace=True to repeat rows)"
            )
        if replace:
            index = torch.randint(len(self), (n,), generator=generator)
        else:
            index = torch.randperm(len(self), generator=generator)[:n]
        return [self[i] for i in index.tolist()]

    def split(self, holdout_fraction: float, seed: int) -> tuple[PromptDataset, PromptDataset]:
        """(train, holdout) by a seeded permutation; both keep file order. At least one row is
        held out when ``holdout_fraction > 0``, and at least one is left to train on."""
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
        n_test = max(1, round(holdout_fraction * len(self)))
        if n_test >= len(self):
            raise ValueError(
                f"holdout_fraction={holdout_fraction} of {len(self)} rows leaves none to train on"
            )
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        test = sorted(perm[:n_test].tolist())
        train = sorted(perm[n_test:].tolist())

        def subset(index: list[int], part: str) -> PromptDataset:
            return PromptDataset(
                [self.prompts[i] for i in index],
                [self.answers[i] for i in index],
                source=f"{self.source} ({part})",
                origins=[self.origins[i] for i in index],
            )

        return subset(train, "train"), subset(test, "holdout")


def load_prompt_datasets(cfg: DataConfig) -> tuple[PromptDataset, PromptDataset | None]:
    """(train, holdout) for ``cfg``; holdout is None when ``cfg.holdout_fraction`` is 0 or None."""
    full = PromptDataset.from_config(cfg)
    if not cfg.holdout_fraction:
        return full, None
    return full.split(cfg.holdout_fraction, cfg.seed)


# -- loading and validation ----------------------------------------------------------------------
def _local_files(path: str) -> list[Path] | None:
    """The data files ``path`` names, or None when it names nothing local (then: a hub name)."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _FORMATS and f.is_file())
        if not files:
            raise FileNotFoundError(
                f"data.path {path!r} is a directory without {sorted(_FORMATS)} files"
            )
    elif glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"data.path {path!r} matches no files")
    elif p.suffix in _FORMATS:
        raise FileNotFoundError(f"data.path {path!r}: no such file")
    else:
        return None
    for f in files:
        if f.suffix not in _FORMATS:
            raise ValueError(f"{f}: unsupported file type; expected one of {sorted(_FORMATS)}")
    return files


def _load_tables(cfg: DataConfig):
    """(name for messages, datasets.Dataset) per file, or one pair for a hub dataset."""
    import datasets

    files = _local_files(cfg.path)
    if files is None:
        try:
            table = datasets.load_dataset(
                cfg.path, cfg.subset, split=cfg.split, cache_dir=cfg.cache_dir
            )
        except ConnectionError as e:
            raise ConnectionError(
                f"data.path {cfg.path!r} is not a local file, directory or glob, and the hub "
                f"dataset could not be reached ({e}). Offline (HF_HUB_OFFLINE=1 or no network)? "
                "Download it where there is network and point data.path at the files."
            ) from e
        yield cfg.path, table
        return
    for f in files:
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a "Generating train split" bar per local file: noise
        try:
            table = datasets.load_dataset(
                _FORMATS[f.suffix], data_files=[str(f)], split="train", cache_dir=cfg.cache_dir
            )
        except Exception as e:
            raise ValueError(
                f"{f}: could not be read as {_FORMATS[f.suffix]}: {_json_problem(f) or e}"
            ) from e
        finally:
            if bars:
                datasets.enable_progress_bars()
        yield str(f), table


def _json_problem(path: Path) -> str | None:
    """Where a json / jsonl file that ``datasets`` refused goes wrong (``datasets`` only says that
    generating the dataset failed): its first bad line, or that it is empty."""
    if path.suffix not in (".json", ".jsonl"):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return str(e)
    if not text.strip():
        return "the file is empty"
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: {e.msg}"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}: {e.msg}: {line[:80]!r}"
        if not isinstance(record, dict):
            return f"line {number}: expected an object {{...}}, got {type(record).__name__}"
    return None


def _column(table, field: str, name: str) -> list:
    """The values of ``field``, as written in the file.

    A json column mixing types (e.g. numbers and strings) gets ``datasets``' ``Json`` feature,
    which stores strings that parse as JSON unquoted, so ``"007"``, ``"[1]"`` and ``"1e3"`` come
    back as 7, [1] and 1000.0; a json column Arrow reads as floats (integers mixed with decimals,
    or an integer beyond int64) rounds integers above 2**53. For such columns the file itself is
    read with :mod:`json`, whose integers are exact.
    """
    import datasets

    feature = table.features[field]
    floats = isinstance(feature, datasets.Value) and feature.dtype.startswith("float")
    if (
        not (isinstance(feature, datasets.Json) or floats)
        or Path(name).suffix not in (".json", ".jsonl")
        or not Path(name).is_file()
    ):
        return list(table[field])
    text = Path(name).read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list) or len(records) != len(table):
        raise ValueError(f"{name}: could not re-read the {len(table)} records of field {field!r}")
    return [r.get(field) if isinstance(r, dict) else None for r in records]


def _validated_rows(table, name: str, cfg: DataConfig) -> tuple[list[str], list[str]]:
    columns = {}
    for field in (cfg.prompt_field, cfg.answer_field):
        if field not in table.column_names:
            raise ValueError(
                f"{name}: row 0: field {field!r} is missing (columns: {table.column_names})"
            )
        values = _column(table, field, name)
        columns[field] = [_as_text(v, name, i, field) for i, v in enumerate(values)]
    for i, answer in enumerate(columns[cfg.answer_field]):
        if not answer.strip():
            raise ValueError(f"{name}: row {i}: field {cfg.answer_field!r} is empty")
    return columns[cfg.prompt_field], columns[cfg.answer_field]


def _as_text(value, name: str, row: int, field: str) -> str:
    """A string, or a number converted to one; whole floats lose the ``.0``: Arrow turns a column
    mixing 7 and 7.5 into floats, and the answer of ``7`` should stay ``"7"``."""
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError(f"{name}: row {row}: field {field!r} is missing (null)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(  # noqa: TRY004 - bad data, reported like every other row error
            f"{name}: row {row}: field {field!r} must be a string or a number, "
            f"got {type(value).__name__} {value!r:.60}"
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name}: row {row}: field {field!r} is {value}")
        if value.is_integer():
            if abs(value) > 2**53:  # e.g. a parquet float column: the digits are already lost
                raise ValueError(
                    f"{name}: row {row}: field {field!r} is the float {value!r}, an integer too "
                    "large to be exact in floating point; store it as a string or an integer"
                )
            return str(int(value))
    return str(value)
