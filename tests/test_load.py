"""Load and faults against `vllm serve` on 127.0.0.1 (bounded in count and time)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from selfjudge_vllm.testing.load import (
    Server,
    check_lossless,
    drive,
    free_port,
    lossless_greedy_indices,
    make_requests,
    reference_texts,
    serve_command,
)
from selfjudge_vllm.testing.tiny_models import write_head
from tests.engine_helpers import spec_config

pytestmark = [pytest.mark.server]


def test_64_concurrent_mixed_requests_with_disconnects(workdir, tiny_pair, tmp_path):
    target, draft = tiny_pair
    # Accept-everything head: judged requests differ from lossless ones as much as possible.
    head = write_head(workdir / "heads/load_accept_all", target, torch.zeros(64), bias=20.0)
    spec = spec_config("draft_model", draft)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    judge = Server(serve_command(target, free_port(), spec, {"selfjudge": {"head": str(head)}}),
                   tmp_path / "judge.log", env=env)
    try:
        # Stock vLLM, no plugin loaded at all: the lossless reference (in vLLM's one-process
        # worker mode, the suite's default: only the judged server is under test here).
        stock = Server(serve_command(target, free_port(), spec, None), tmp_path / "stock.log",
                       env={"VLLM_PLUGINS": "none-of-ours"})
        try:
            requests = make_requests(72, seed=1)
            start = time.monotonic()
            report, texts = asyncio.run(drive(judge.base, requests, concurrency=64))
            elapsed = time.monotonic() - start
            indices = lossless_greedy_indices(requests, texts)
            reference = asyncio.run(reference_texts(stock.base, requests, indices))
            check_lossless(report, requests, texts, reference)
        finally:
            stock.stop()
        assert report.errors == []
        assert report.dropped_streams > 0
        assert report.served + report.dropped_streams == len(requests)
        assert report.lossless_greedy_checked >= 10 and report.lossless_mismatches == 0
        # The server keeps serving after the disconnects, and its counters agree with vLLM's.
        after, _ = asyncio.run(drive(judge.base, make_requests(4, seed=2), concurrency=4))
        assert after.errors == [] and after.served + after.dropped_streams == 4
        time.sleep(2.5)  # workers publish counters once a second
        drafts = judge.metric("vllm:spec_decode_num_draft_tokens_total")
        scored = judge.metric("vllm:spec_decode_selfjudge_draft_tokens_total")
        # vLLM leaves out the drafts of a step whose request was aborted by the client; the
        # judge scored them. Nothing else may differ (4 draft tokens per step here).
        assert 0 < drafts <= scored <= drafts + 4 * report.dropped_streams
        accepted = judge.metric("vllm:spec_decode_selfjudge_judge_accepted_total")
        deferred = judge.metric("vllm:spec_decode_selfjudge_judge_deferred_total")
        assert accepted + deferred == scored and 0 < accepted < scored
        print(f"{len(requests)} requests in {elapsed:.1f}s, p50 {report.percentile(0.5):.2f}s, "
              f"p99 {report.percentile(0.99):.2f}s, {report.dropped_streams} dropped streams, "
              f"{report.lossless_greedy_checked} lossless greedy responses checked")
    finally:
        judge.stop()
