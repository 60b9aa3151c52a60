"""The one benchmark runner: both experiments (the Gemma sweep, `tradeoff.py`; the Qwen
benchmark, `chat_tradeoff.py`) serve their points through it, on the package's measurement
engine (`selfjudge_vllm/measurement.py`: the per-request store, vLLM's counters and a point's
acceptance from them (`point_summary`), progress).

A point is (server, method, knob): a server is (proposer, draft length), or REFERENCE (the
target alone); every point of a server is served on one `vllm serve` process through
per-request control, one point at a time, so vLLM's counters are never mixed. A `Sitting`
starts a server only when one of its points lacks something, persists every request as it
completes, and starts no new work after --max-minutes: rerunning the same command continues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from selfjudge_vllm.measurement import Progress, log, measure_point, needs_work

REFERENCE = ("target", 0)  # the server without speculative decoding
NGRAM = {"prompt_lookup_min": 2, "prompt_lookup_max": 5}  # every ngram server's lookup settings


def point_key(server: tuple[str, int], method: str, knob) -> str:
    proposer, k = server
    return f"{proposer}-k{k}/{method}" + ("" if knob is None else f"-{knob}")


def parse_key(key: str) -> tuple[str, int, str, float | None]:
    server, point = key.split("/")
    proposer, k = server.rsplit("-k", 1)
    method, _, knob = point.partition("-")
    return proposer, int(k), method, (float(knob) if knob else None)


def speculative_config(server: tuple[str, int], draft: Path | None) -> dict | None:
    proposer, k = server
    if proposer == "draft_model":
        return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
    if proposer == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, **NGRAM}
    return None  # REFERENCE


def plugin_config(head: Path | None, request_rules: list[str], fly_window: int | None = None) -> dict:
    """The judge by default (top_alpha without a head); requests may choose `request_rules`."""
    section = ({"head": str(head), "rule": "judge"} if head else {"rule": "top_alpha"}) | {"request_rules": request_rules}
    if fly_window is not None:
        section["fly_window"] = fly_window
    return {"selfjudge": section}


def start_server(target: Path, server: tuple[str, int], spec: dict | None, plugin: dict | None, log_path: Path,
                 dtype: str, max_model_len: int, extra_args: tuple[str, ...] = ()):
    from selfjudge_vllm.server_process import Server, free_port, serve_command

    proposer, k = server
    command = serve_command(target, free_port(), spec, plugin if spec else None, model_name="target", dtype=dtype,
                            extra_args=list(extra_args), max_model_len=max_model_len)
    log(f"server: {proposer}" + (f", k={k}" if spec else " (no speculative decoding)") + "; starting (minutes)")
    return Server(command, log_path, startup_timeout=900)


class Sitting:
    """One sitting's work on a store: `work_on(start, plan)` serves what the plan's points
    lack on a server started by `start()` (only if something is missing), and no new point or
    segment begins after `max_minutes`."""

    def __init__(self, store, concurrency: int, batch1_items: int, max_minutes: float | None = None):
        self.store, self.concurrency, self.batch1_items = store, concurrency, batch1_items
        self.max_minutes, self.started = max_minutes, time.monotonic()

    def out_of_time(self) -> bool:
        return self.max_minutes is not None and (time.monotonic() - self.started) / 60 > self.max_minutes

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    def work_on(self, start, plan, hopeless=lambda key: None) -> None:
        """plan: [(key, items, request options)]; hopeless(key): a reason to stop that point
        early, or None."""
        store = self.store
        todo = [(key, items, extra) for key, items, extra in plan if needs_work(store, key, items, self.batch1_items)]
        if not todo or self.out_of_time():
            return
        # Every item no counters segment covers is served in this sitting: the new ones, and
        # those of a segment a cut sitting left (served again for their counters).
        to_serve = sum(len(store.uncounted(key, {i.id for i in store.in_scope(key, items)})) for key, items, _ in todo)
        server = start()
        try:
            progress = Progress(to_serve)
            for key, items, extra in todo:
                if self.out_of_time():
                    log(f"--max-minutes reached; stopping before {key} (rerun to continue)")
                    return
                if not measure_point(server, store, key, items, extra, self.concurrency, progress, self.out_of_time,
                                     lambda key=key: hopeless(key), self.batch1_items):
                    return
        finally:
            server.stop()


def interleaved(sweep: dict) -> list[tuple[str, float | None]]:
    """(method, knob) pairs taking each method's knobs in turn, tightest first, so a sitting
    cut short has measured every method at comparable settings."""
    queues = {m: list(knobs) for m, knobs in sweep.items()}
    out = []
    while any(queues.values()):
        for method, queue in queues.items():
            if queue:
                out.append((method, queue.pop(0)))
    return out


def judge_thresholds(head: Path, fallback: list[float]) -> list[float]:
    """The head's `accepts_*` operating points (the share of validation mismatches it
    accepts), loosest last: they span each head's own score range, so heads whose scores
    are scaled differently are swept alike. `fallback` for a head without them."""
    from selfjudge_vllm.artifact import JudgeArtifact

    points = JudgeArtifact.load(head).config.operating_points
    named = sorted((p.threshold for name, p in points.items() if name.startswith("accepts_")), reverse=True)
    return [round(t, 6) for t in named] or fallback


def head_digest(head: Path) -> str:
    """SHA-256 of a head's tensors (names, dtypes, shapes, values): what its decisions depend
    on. Not the file's bytes: safetensors writes its metadata in no fixed order, so the same
    head retrained (e.g. to add operating points) is another file."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(head / "model.safetensors").items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_heads_unchanged(store_folder: Path, heads: dict[str, Path | None], script: str) -> None:
    """The store's judge points belong to the heads that produced them: record the heads'
    digests at first use and refuse to go on with other heads."""
    from selfjudge_vllm.files import file_sha256

    record = store_folder / "heads.json"
    before = json.loads(record.read_text()) if record.is_file() else {}
    now, changed = {}, []
    for name, path in heads.items():
        if path is None:
            continue
        now[name] = head_digest(path)
        # Stores begun before digests recorded the file's SHA-256: still the same head.
        legacy = file_sha256(path / "model.safetensors")
        if name in before and before[name] not in (now[name], legacy):
            changed.append(name)
    if changed:
        sys.exit(f"{script}: the {', '.join(changed)} head differs from the one {store_folder} was measured "
                 "with; use another --results folder or the original head")
    record.write_text(json.dumps({**before, **now}, indent=1))


def add_quick_max_tokens(parser, folder_flag: str) -> None:
    """`--max-tokens`: a --quick run's cap on every item's max_tokens (the tests' shorter smoke run)."""
    parser.add_argument("--max-tokens", type=int,
                        help="with --quick: cap every item's max_tokens (a shorter smoke run, as the tests make; "
                        f"give it a {folder_flag} folder of its own, whose store then holds only capped answers)")


def check_quick_max_tokens(parser, args) -> None:
    if args.max_tokens is not None and not args.quick:
        parser.error("--max-tokens caps a --quick run only")


def cap_max_tokens(items: list, cap: int | None) -> list:
    """Items (dataclasses with max_tokens) with max_tokens at most `cap` (None: unchanged)."""
    if cap is None:
        return items
    return [dataclasses.replace(i, max_tokens=min(i.max_tokens, cap)) for i in items]


def package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
