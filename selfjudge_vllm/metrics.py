"""Judge counters and how they travel from the worker processes to the API server.

vLLM's workers have no channel for a plugin's statistics, so each worker writes its
cumulative counters to a small JSON file (atomic rename) in a folder named after the vLLM
instance; the API server's stat logger (stat_logger.py) sums those files when it logs and
when Prometheus scrapes `/metrics`. No vLLM import here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class JudgeCounters:
    # Valid (non-padding) draft tokens the judge scored.
    draft_tokens: int = 0
    # Of those, the ones the request's rule forced before verification; all others went to
    # standard verification unchanged. An upper bound on what relaxation changed: it also
    # counts forced drafts the target would have accepted itself (its own choice) and forced
    # rows after the request's first rejection, which are never emitted. What relaxation
    # changed is vLLM's own accepted-token count against a lossless run of the same traffic.
    judge_accepted: int = 0
    # Verification steps with the judge applied.
    steps_judged: int = 0
    # rejection_sample calls during a step that verified other drafts than the step's own.
    unmatched_calls: int = 0

    @property
    def judge_deferred(self) -> int:
        return self.draft_tokens - self.judge_accepted

    def add(self, other: "JudgeCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def log(self, logger: logging.Logger) -> None:
        share = self.judge_accepted / self.draft_tokens if self.draft_tokens else 0.0
        logger.info(
            "SelfJudge: draft tokens scored: %d, forced by the rule before verification: %d (%.1f%%; "
            "an upper bound on what relaxation changed), sent to standard verification: %d, steps: %d",
            self.draft_tokens,
            self.judge_accepted,
            100.0 * share,
            self.judge_deferred,
            self.steps_judged,
        )


def metrics_dir(instance_id: str) -> Path:
    """Where workers of one vLLM instance publish their counters."""
    base = os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir()
    return Path(base) / f"selfjudge-metrics-{instance_id or 'default'}"


def remove_metrics_dir(directory: Path) -> None:
    """At the API server's exit: the workers are gone, their counters with them."""
    shutil.rmtree(directory, ignore_errors=True)


class MetricsSink:
    """Worker side: publishes this process's cumulative counters."""

    def __init__(self, directory: Path, rank: int = 0):
        self.directory = directory
        self.path = directory / f"worker-{rank}-{os.getpid()}.json"

    def write(self, counters: JudgeCounters) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(counters)))
            os.replace(tmp, self.path)
        except OSError as exc:  # metrics must never take the server down
            logging.getLogger("vllm.selfjudge").warning("cannot publish judge metrics: %s", exc)


def read_counters(directory: Path) -> JudgeCounters:
    """API-server side: the sum over every worker's published counters."""
    total = JudgeCounters()
    if not directory.is_dir():
        return total
    names = {f.name for f in fields(JudgeCounters)}
    for path in directory.glob("worker-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a file being replaced right now; the next read sees it
        total.add(JudgeCounters(**{k: int(v) for k, v in data.items() if k in names}))
    return total
