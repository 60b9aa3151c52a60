"""API-server side of the judge's metrics (entry point `vllm.stat_logger_plugins`).

vLLM builds one stat logger per engine in the process that serves `/metrics`. This one sums
the counters the workers publish (metrics.py) and exposes them next to vLLM's own
`vllm:spec_decode_*` counters, and logs a judge line at vLLM's log interval. It does nothing
for engines whose config has no enabled `selfjudge` section.

Note: vLLM turns stat logging on when any stat logger plugin is installed, even with
--disable-log-stats (vLLM 0.32 behaviour for AsyncLLM).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily
from vllm.v1.metrics.loggers import StatLoggerBase

from selfjudge_vllm.config import parse_section
from selfjudge_vllm.metrics import metrics_dir, read_counters, remove_metrics_dir

logger = logging.getLogger("vllm.selfjudge")

METRIC_PREFIX = "vllm:spec_decode_selfjudge"


class _JudgeCollector:
    """Prometheus collector reading the workers' counters at scrape time."""

    def __init__(self) -> None:
        self.sources: dict[str, Path] = {}  # model_name -> metrics folder

    def collect(self):
        families = {
            "draft_tokens": "Draft tokens the SelfJudge head scored.",
            "judge_accepted": "Draft tokens the request's rule forced before verification (includes drafts the "
                              "target would have accepted and rows after a rejection: an upper bound on what "
                              "relaxation changed).",
            "judge_deferred": "Draft tokens the request's rule left to standard verification.",
            "steps": "Verification steps with the SelfJudge head applied.",
        }
        metrics = {
            name: CounterMetricFamily(f"{METRIC_PREFIX}_{name}", doc, labels=["model_name"])
            for name, doc in families.items()
        }
        for model_name, directory in self.sources.items():
            c = read_counters(directory)
            values = {
                "draft_tokens": c.draft_tokens,
                "judge_accepted": c.judge_accepted,
                "judge_deferred": c.judge_deferred,
                "steps": c.steps_judged,
            }
            for name, value in values.items():
                metrics[name].add_metric([model_name], value)
        yield from metrics.values()


_collector: _JudgeCollector | None = None


def _shared_collector() -> _JudgeCollector:
    global _collector
    if _collector is None:
        _collector = _JudgeCollector()
        REGISTRY.register(_collector)
    return _collector


class SelfJudgeStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        # Parsing here also rejects a bad section in the API server, before any worker.
        config = parse_section(vllm_config.additional_config)
        self.enabled = config is not None and config.enabled
        self.directory = metrics_dir(vllm_config.instance_id)
        if self.enabled:
            name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
            if isinstance(name, (list, tuple)):
                name = name[0]
            _shared_collector().sources[str(name)] = self.directory
            atexit.register(remove_metrics_dir, self.directory)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        pass

    def log_engine_initialized(self):
        pass

    def log(self):
        if self.enabled:
            read_counters(self.directory).log(logger)
