"""Read and write Hugging Face model directories (``config.json`` + safetensors).

Reading is lazy: :class:`HFCheckpoint` opens each safetensors file once and reads a tensor only
when asked, so a rank converting its shard of a large model touches only what it needs. Errors name
the directory and the missing or damaged file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["HFCheckpoint", "read_hf_config", "write_hf_model", "write_json"]

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ImportError(
            "HF conversion needs the `safetensors` package: pip install safetensors"
        ) from None
    return safetensors


def read_hf_config(hf_dir: str | Path) -> dict:
    """``config.json`` of an HF model directory."""
    path = Path(hf_dir) / CONFIG
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"HF model directory {hf_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no {CONFIG}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (truncated?): {e}") from None


class HFCheckpoint:
    """The tensors of an HF model directory (``model.safetensors`` or a sharded index)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.config = read_hf_config(self.dir)
        self._handles: dict[str, object] = {}
        self._where = self._index()

    def _index(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is damaged: {e}") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.dir}: {INDEX} names missing files {missing}")
            return dict(weight_map)
        single = self.dir / SINGLE
        if not single.is_file():
            raise FileNotFoundError(
                f"{self.dir} has neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read)"
            )
        return {name: SINGLE for name in self._open(SINGLE).keys()}

    def _open(self, filename: str):
        if filename not in self._handles:
            safetensors = _safetensors()
            try:
                self._handles[filename] = safetensors.safe_open(
                    str(self.dir / filename), framework="pt"
                )
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise ValueError(f"{self.dir / filename} is damaged or truncated: {e}") from None
        return self._handles[filename]

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; ``KeyError`` naming the directory when absent."""
        if name not in self._where:
            raise KeyError(f"{self.dir} has no tensor {name!r}")
        filename = self._where[name]
        try:
            return self._open(filename).get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"{self.dir / filename}: cannot read {name!r} (truncated?): {e}"
            ) from None


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_hf_model(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: dict,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index above the limit)."""
    safetensors = _safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        safetensors.torch.save_file(shards[0], str(out / SINGLE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            safetensors.torch.save_file(shard, str(out / filename), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, filename))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out / CONFIG, config)
    return out
