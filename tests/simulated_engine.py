"""A simulated engine for `selfjudge calibrate`: `calibrate.run` end to end (its split, serving
order, early stop, pairing, p-values, fixed-sequence testing, Bonferroni and report) with
`vllm serve` replaced by draws at risks the test sets.

Each prompt's lossless answer is right with probability 1/2, drawn once per prompt. A point
with risk r (and gain share g) turns a right lossless answer wrong with probability 2(r + g)
and a wrong one right with probability 2g, drawn once per (point, prompt), independently
across prompts: P(lost) - P(gained) = r (accuracy lost), and with g = 0 the share of answers
(and texts) changed is r.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from selfjudge_vllm import calibrate, measurement
from selfjudge_vllm.answers import AnswerKind

RIGHT, WRONG, OTHER_WRONG = "#### 1", "#### 7", "#### 8"


class SimulatedEngine:
    base = "simulated"

    def __init__(self, risks: dict[tuple[str, float], float], seed: int = 0, gained: float = 0.0):
        self.risks, self.gained = risks, gained
        self.rng = np.random.default_rng(seed)
        self.lossless_right: dict[str, bool] = {}
        self.texts: dict[tuple, str] = {}
        self.served: list[tuple[str, str]] = []  # (point, prompt id) in serving order
        self.counters = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
        self.clock = 0.0  # minutes: one per request served (for --max-minutes)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(calibrate.Session, "get", lambda session: self)
        monkeypatch.setattr(measurement, "run_items", self.run_items)
        monkeypatch.setattr(measurement, "spec_counters", lambda server: dict(self.counters))

        class Clock:  # calibrate's --max-minutes reads this clock, in seconds
            @staticmethod
            def monotonic():
                return 60.0 * self.clock

        monkeypatch.setattr(calibrate, "time", Clock)

    def point(self, extra: dict) -> tuple[str, float] | None:
        if extra.get("selfjudge_enabled") == "false":
            return None
        rule = extra["selfjudge_rule"]
        return rule, float(next(v for k, v in extra.items() if k != "selfjudge_rule"))

    def text(self, point, item_id: str) -> str:
        right = self.lossless_right.setdefault(item_id, bool(self.rng.random() < 0.5))
        if point is None:
            return RIGHT if right else WRONG
        key = (point, item_id)
        if key not in self.texts:
            risk = self.risks[point]
            flip = self.rng.random() < 2 * ((risk + self.gained) if right else self.gained)
            self.texts[key] = (OTHER_WRONG if flip else RIGHT) if right else (RIGHT if flip else WRONG)
        return self.texts[key]

    async def run_items(self, base_url, items, extra, concurrency, on_done, model="target") -> float:
        point = self.point(extra)
        for item in items:
            self.clock += 1.0
            self.served.append(("lossless" if point is None else calibrate.point_key(*point), item.id))
            # a looser point accepts more: acceptance length 1 + 1 / (1 + knob)
            self.counters["drafts"] += 1
            self.counters["draft_tokens"] += 4
            self.counters["accepted"] += 0.0 if point is None else 1.0 / (1.0 + point[1])
            on_done(item, {"text": self.text(point, item.id), "tokens": 1, "latency_s": 0.0})
        return 0.0


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "answer": "1"}) + "\n"
                            for i in range(n)))
    return path


def settings(prompts: Path, out: Path, grids: dict[str, tuple[float, ...]], **over) -> calibrate.CalibrateSettings:
    base = dict(target="simulated", speculative_config={"method": "ngram"}, prompts=prompts, out=out,
                measure="answer_changes", budget=0.1, confidence=0.9, answer=AnswerKind("numeric"),
                rules=tuple(grids), grids=grids, test_share=0.0, dtype="float32")
    base.update(over)
    return calibrate.CalibrateSettings(**base)
