"""benchmarks/tradeoff.py end to end on the tiny models (--quick): it runs, writes every
output, and its lossless points reproduce the target-alone reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from selfjudge_vllm.measurement import RequestStore
from selfjudge_vllm.testing.tiny_models import write_head

pytestmark = pytest.mark.server


def test_quick_tradeoff_on_tiny_models(tmp_path, tiny_pair, monkeypatch, capsys):
    target, draft = tiny_pair
    head = write_head(tmp_path / "head", target, torch.zeros(64), bias=0.0)  # score 0.5 everywhere
    results = tmp_path / "results"
    # Continuations of 32 tokens, not 64 (short answers stay at 10): every assertion below
    # holds on any length (lossless k=3 still verifies ~30 steps a continuation).
    command = [sys.executable, "benchmarks/tradeoff.py", "--quick", "--testbed", str(target.parent),
               "--draft", str(draft), "--head", str(head), "--dtype", "float32", "--max-model-len", "512",
               "--families", "short_answer,continuation", "--work", str(tmp_path / "work"),
               "--results", str(results), "--batch1-items", "1", "--max-tokens", "32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((results / "tradeoff_quick.json").read_text())
    points = {(p["proposer"], p["method"]): p for p in report["points"]}
    assert len(points) == 8  # 2 proposers x (lossless, judge, top_alpha, entropy)
    alone = RequestStore(tmp_path / "work/tradeoff_quick/store").done("target-k0/alone")
    reference = {item_id: row["text"] for item_id, row in alone.items()}
    for proposer in ("draft_model", "ngram"):
        lossless = points[(proposer, "lossless")]
        # Greedy lossless SD reproduces the target alone, item for item.
        texts = next(p["items"] for p in report["items"] if (p["proposer"], p["method"]) == (proposer, "lossless"))
        assert len(texts) == 24 and all(row["text"] == reference[row["id"]] for row in texts)
        assert lossless["continuation_exact"] == 1.0 and lossless["continuation"] == pytest.approx(1.0, abs=1e-5)
        assert lossless["drafts"] > 0 and lossless["mean_acceptance_length"] >= 1.0
        # The judge at threshold 0.5 with a score of exactly 0.5 accepts every draft token.
        judge = points[(proposer, "judge")]
        assert judge["accepted"] == judge["draft_tokens"] > 0
        assert judge["mean_acceptance_length"] > lossless["mean_acceptance_length"]
    assert len(report["headlines"]) == 2
    assert (results / "tradeoff_quick.csv").read_text().count("\n") == 9
    markdown = (results / "tradeoff_quick.md").read_text()
    assert "| draft_model | 3 | judge | 0.5 |" in markdown
    for proposer in ("draft_model", "ngram"):
        for kind in ("acceptance", "speed"):
            assert (results / f"tradeoff_quick_{proposer}_{kind}.png").stat().st_size > 10_000
    assert report["setup"]["head_features"] == ["hidden"] and report["setup"]["max_tokens_cap"] == 32
    # Rerun: every point exists, so it only rebuilds the report, starting no server. Compared
    # with itself as the earlier sweep, each budget's earlier and current judge points agree.
    # (In this process: the same main() the script runs, without a second interpreter loading
    # torch and vLLM again; a server start would fail the test.)
    first = report
    from benchmarks import tradeoff

    def no_server(*args, **kwargs):
        raise AssertionError("the rerun started a server")

    monkeypatch.setattr(tradeoff, "start_server", no_server)
    capsys.readouterr()
    assert tradeoff.main(command[2:] + ["--compare-with", str(results / "tradeoff_quick.json")]) == 0
    again = capsys.readouterr().out
    assert "server:" not in again and "0 to run" in again
    comparison = (results / "tradeoff_quick.md").read_text().split("Against the earlier sweep's judge")[1]
    for headline in first["headlines"]:
        row = next(line for line in comparison.splitlines()
                   if line.startswith(f"| {headline['proposer']} | {headline['k']} |"))
        cells = row.strip(" |").split(" | ")[2:]
        assert len(cells) == 6  # three budgets on every task, then 1% on each task alone
        for cell in cells:
            earlier, current, _ = cell.split(" / ")
            assert earlier == current
        for cell, budget in zip(cells, ("0.01", "0.05", "0.1")):
            best_free = headline["budgets"][budget]["best_training_free"]
            assert cell.split(" / ")[2] == ("-" if best_free is None else f"{best_free['mean_acceptance_length']:.2f}")
