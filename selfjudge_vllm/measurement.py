"""The measurement engine: serve a set of prompts under each candidate point of one
`vllm serve` server, persist every response as it completes, read vLLM's speculative-decoding
counters around each run of requests, and continue where a killed run stopped.
`selfjudge calibrate` and the benchmarks measure through it. No vLLM import: it talks to the
server over HTTP.

A point is one way of verifying (lossless, or a rule and its knob) sent with every request
through per-request control (`vllm_xargs`), so all points of a server are measured side by
side on one engine, one point at a time (vLLM's counters are per server).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from selfjudge_vllm.rules import RULES
from selfjudge_vllm.server_process import parse_metric


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_jsonl(path: Path, row: dict) -> None:
    """One row, flushed to disk before returning: a kill loses nothing already appended."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class PromptItem:
    """One prompt as it is served: its id, the prompt text (chat messages already rendered
    with the target's template), its token budget and stop strings."""

    id: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()


def request_options(method: str, knob) -> dict:
    """The `vllm_xargs` of a point: lossless, or a rule (rules.RULES) with its knob."""
    if method == "lossless":
        return {"selfjudge_enabled": "false"}
    return {"selfjudge_rule": method, f"selfjudge_{RULES[method].knob}": knob}


def spec_counters(server) -> dict:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens) now."""
    text = server.get("/metrics")
    names = {"drafts": "vllm:spec_decode_num_drafts_total",
             "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
             "accepted": "vllm:spec_decode_num_accepted_tokens_total"}
    counts = {}
    for key, name in names.items():
        try:
            counts[key] = parse_metric(text, name)
        except KeyError:  # before the first speculative step vLLM has not exported it yet
            counts[key] = 0.0
    return counts


class RequestStore:
    """`requests.jsonl`: {"point", "id", "text", "tokens", "latency_s"} per finished request;
    `segments.jsonl`: {"point", "ids", "counters", "wall_s", "tokens"} per run of requests that
    finished together (vLLM's counters are read around it), and batch-1 timings. A request
    whose segment was cut off keeps its output; only its segment's counters are missing."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.requests_path, self.segments_path = folder / "requests.jsonl", folder / "segments.jsonl"
        self.requests: dict[str, dict[str, dict]] = {}
        for row in load_jsonl(self.requests_path):
            self.requests.setdefault(row["point"], {})[row["id"]] = row
        self.segments = load_jsonl(self.segments_path)

    def done(self, point: str) -> dict[str, dict]:
        return self.requests.get(point, {})

    def add_request(self, row: dict) -> None:
        self.requests.setdefault(row["point"], {})[row["id"]] = row
        append_jsonl(self.requests_path, row)

    def add_segment(self, row: dict) -> None:
        # timings depend on these (acceptance and texts do not)
        if all_cores_for_the_worker():
            row = {**row, "worker_cores": "all"}
        if os.environ.get("NUMBA_THREADING_LAYER"):
            row = {**row, "numba_threading_layer": os.environ["NUMBA_THREADING_LAYER"]}
        self.segments.append(row)
        append_jsonl(self.segments_path, row)

    def counter_segments(self, point: str, ids: set[str]) -> list[dict]:
        """The segments whose counters belong to `ids` of a point, no item counted twice:
        newest first, each segment none of whose items a newer chosen one already has (vLLM's
        counters add up over disjoint runs; a re-measure supersedes what it repeats)."""
        chosen, counted = [], set()
        for segment in reversed(self.segments):
            members = set(segment["ids"])
            if (segment["point"] == point and "counters" in segment and members <= ids
                    and not members & counted):
                chosen.append(segment)
                counted |= members
        return chosen[::-1]

    def uncounted(self, point: str, ids: set[str]) -> set[str]:
        """Items of `ids` no counters segment of the point covers (a sitting ended while they ran)."""
        return ids - {i for segment in self.counter_segments(point, ids) for i in segment["ids"]}

    def counters_cover(self, point: str, ids: set[str]) -> bool:
        return not self.uncounted(point, ids)

    def batch1(self, point: str) -> dict | None:
        return next((s for s in self.segments if s["point"] == point and s.get("batch1")), None)

    def stopped_early(self, point: str) -> str | None:
        """Why the confirmation stopped this point before its last item (None: it did not)."""
        return next((s["stopped_early"] for s in self.segments if s["point"] == point and "stopped_early" in s), None)

    def in_scope(self, point: str, items: list) -> list:
        """The items a point is measured on: all of them, or the ones it had served when it
        was stopped early."""
        return [i for i in items if i.id in self.done(point)] if self.stopped_early(point) else items


# What gives a CPU vLLM server's model every core (give_the_worker_every_core says why).
EVERY_CORE_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "NUMBA_THREADING_LAYER": "workqueue"}


def all_cores_for_the_worker() -> bool:
    """vLLM's CPU backend leaves one core to its scheduler process by default,
    which on 2 cores halves the model's threads (measured: 1.56x tokens/s with all cores)."""
    return os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == "0"


def give_the_worker_every_core() -> None:
    """What a benchmark's --all-cores sets for the servers it starts (they inherit the environment).

    The numba setting is for `ngram`: vLLM's n-gram proposer runs a numba-parallel function
    after `numba.set_num_threads(1)` and then "restores" numba's default, which is 1 because
    the worker's main thread is pinned to one core (GOMP_CPU_AFFINITY). With numba's OpenMP
    layer that sets the OpenMP thread count the target's oneDNN GEMMs use, so they ran on one
    core. numba's own `workqueue` layer leaves OpenMP alone (measured: 1.73x tokens/s)."""
    os.environ.update(EVERY_CORE_ENV)


def every_core_env() -> dict[str, str]:
    """EVERY_CORE_ENV for the variables the operator has not set: what a CPU server that
    `selfjudge calibrate` starts gets by default."""
    return {k: v for k, v in EVERY_CORE_ENV.items() if k not in os.environ}


async def _request(client, item, body, model):
    start = time.monotonic()
    out = await client.completions.create(
        model=model, prompt=item.prompt, max_tokens=item.max_tokens, temperature=0.0,
        stop=list(item.stop) or None, extra_body=body, timeout=3600,
    )
    return {"text": out.choices[0].text, "tokens": out.usage.completion_tokens,
            "latency_s": time.monotonic() - start}


async def run_items(base_url, items, extra, concurrency, on_done, model="target") -> float:
    """All items with at most `concurrency` in flight; `on_done(item, result)` as each ends."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    gate, body = asyncio.Semaphore(concurrency), ({"vllm_xargs": extra} if extra else None)

    async def one(item):
        async with gate:
            on_done(item, await _request(client, item, body, model))

    start = time.monotonic()
    try:
        await asyncio.gather(*(one(item) for item in items))
    finally:
        await client.close()
    return time.monotonic() - start


PROGRESS_EVERY = 14  # requests between progress lines inside a point
# Requests per counters segment: a sitting that ends inside a point loses the counters of at
# most this many finished requests (served once more for them); a larger segment keeps the
# batch full for longer (each segment drains before the next starts).
SEGMENT_ITEMS = 64


class Progress:
    """Requests served / to serve in this sitting, with an ETA from this sitting's pace
    (create it once the server is up, so start-up minutes do not count as serving time);
    `unit` names what is counted when it is not requests (e.g. pairs scored)."""

    def __init__(self, planned: int, unit: str = "requests"):
        self.planned, self.done, self.started, self.unit = planned, 0, time.monotonic(), unit

    def tick(self, n=1, label=""):
        self.done += n
        if label and self.done % PROGRESS_EVERY == 0:  # a point takes minutes: show it moving
            log(f"    {label}: {self.line()}")

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        left = self.planned - self.done
        eta = f"{left * elapsed / self.done / 60:.0f} min" if self.done else "n/a"
        return f"{self.done}/{self.planned} {self.unit}, ETA {eta} at this sitting's pace"


def point_summary(store, key: str, ids: set[str]) -> dict:
    """A point's acceptance (vLLM's counters over the segments covering `ids`) and speed;
    `timed_items` says how many of `ids` those segments cover (all, for the figures to be the
    point's on `ids`)."""
    segments = store.counter_segments(key, ids)
    counts = {name: sum(s["counters"].get(name, 0.0) for s in segments) for name in ("drafts", "draft_tokens", "accepted")}
    wall, tokens = sum(s["wall_s"] for s in segments), sum(s["tokens"] for s in segments)
    batch1 = store.batch1(key)
    return {
        **counts,
        "mean_acceptance_length": 1 + counts["accepted"] / counts["drafts"] if counts["drafts"] else None,
        "acceptance_rate": counts["accepted"] / counts["draft_tokens"] if counts["draft_tokens"] else None,
        "tokens_per_s": tokens / wall if wall else None,
        "tokens_per_s_batch1": batch1["tokens"] / batch1["wall_s"] if batch1 else None,
        "timed_items": sum(len(s["ids"]) for s in segments),
        "timed_items_all_cores": sum(len(s["ids"]) for s in segments if s.get("worker_cores") == "all"),
        "timed_items_numba_workqueue": sum(len(s["ids"]) for s in segments
                                           if s.get("numba_threading_layer") == "workqueue"),
    }


def missing_steps(store, key, items, batch1_items=0) -> list[str]:
    """What measure_point still has to do for this point, in its order: "requests" (items
    without a stored output), "counters" (vLLM's counters cover only part of the items),
    "batch1" (no batch-1 timing yet, when one is asked for)."""
    ids = {i.id for i in store.in_scope(key, items)}
    checks = {"requests": not ids <= store.done(key).keys(), "counters": not store.counters_cover(key, ids),
              "batch1": batch1_items > 0 and store.batch1(key) is None}
    return [step for step, missing in checks.items() if missing]


def needs_work(store, key, items, batch1_items=0) -> bool:
    return bool(missing_steps(store, key, items, batch1_items))


def measure_point(server, store, key, items, extra, concurrency, progress, out_of_time=lambda: False,
                  hopeless=lambda: None, batch1_items=0, record_stop=True) -> bool:
    """Runs the point's missing items (persisting each; vLLM's counters read around every
    SEGMENT_ITEMS of them) and, once, its batch-1 timing. Returns False when `out_of_time()`
    stopped it between segments (rerun to continue). Before each segment `hopeless()` may
    give a reason to stop the point: for good, recorded in the store (`record_stop`), or for
    this run only (the caller decides again next time, e.g. under another budget)."""
    if "requests" in missing_steps(store, key, items):
        pending = [i for i in items if i.id not in store.done(key)]
        for start in range(0, len(pending), SEGMENT_ITEMS):
            if start and out_of_time():
                log(f"--max-minutes reached inside {key}; {len(pending) - start} requests left (rerun to continue)")
                return False
            reason = hopeless()
            if reason and not record_stop:
                log(f"  {key}: stopped, {reason}; {len(pending) - start} requests not served")
                progress.planned -= len(pending) - start
                return True
            if reason:
                log(f"  {key}: stopped early, {reason}; {len(pending) - start} requests not served")
                store.add_segment({"point": key, "ids": [], "stopped_early": reason,
                                   "measured": datetime.date.today().isoformat()})
                progress.planned -= len(pending) - start
                break
            segment = pending[start:start + SEGMENT_ITEMS]
            before = spec_counters(server)  # zeros on a server without speculative decoding

            def on_done(item, result):
                store.add_request({"point": key, "id": item.id, **result})
                progress.tick(label=key)

            wall = asyncio.run(run_items(server.base, segment, extra, concurrency, on_done))
            after = spec_counters(server)
            store.add_segment({"point": key, "ids": [i.id for i in segment], "wall_s": wall,
                               "tokens": sum(store.done(key)[i.id]["tokens"] for i in segment),
                               "counters": {k: after[k] - before[k] for k in after},
                               "measured": datetime.date.today().isoformat()})
            log(f"  {key}: {len(segment)} requests in {wall / 60:.1f} min; {progress.line()}")
    items = store.in_scope(key, items)
    if "counters" in missing_steps(store, key, items):  # asked again: the requests above add counters
        # A sitting ended inside this point before: the outputs of the segment it cut are all
        # kept, but no counters cover them. Serve those items once more for the counters and
        # the speed (greedy: the texts are the stored ones; how many match is recorded).
        uncounted = store.uncounted(key, {i.id for i in items})
        again_items = [i for i in items if i.id in uncounted]
        before = spec_counters(server)
        texts = {}

        def on_again(item, result):
            texts[item.id] = result
            progress.tick(label=f"{key} (counters re-measure)")

        wall = asyncio.run(run_items(server.base, again_items, extra, concurrency, on_again))
        after = spec_counters(server)
        store.add_segment({"point": key, "ids": [i.id for i in again_items], "wall_s": wall, "remeasure": True,
                           "tokens": sum(r["tokens"] for r in texts.values()),
                           "counters": {k: after[k] - before[k] for k in after},
                           "same_text": sum(texts[i]["text"] == r["text"] for i, r in store.done(key).items()
                                            if i in texts),
                           "measured": datetime.date.today().isoformat()})
        log(f"  {key}: counters re-measured on the {len(again_items)} items a cut segment left uncounted "
            f"in {wall / 60:.1f} min")
    if "batch1" in missing_steps(store, key, items, batch1_items):
        b1 = items[: batch1_items]
        results = []
        wall = asyncio.run(run_items(server.base, b1, extra, 1, lambda item, r: results.append(r)))
        store.add_segment({"point": key, "batch1": True, "ids": [i.id for i in b1], "wall_s": wall,
                           "tokens": sum(r["tokens"] for r in results)})
    return True


