"""`vllm serve` with the judge on 127.0.0.1: OpenAI completions and chat completions, the
judge's counters on /metrics next to vLLM's spec_decode counters, stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from selfjudge_vllm.testing.load import Server, free_port, parse_metric, serve_command
from selfjudge_vllm.testing.tiny_models import write_head
from tests.engine_helpers import spec_config

pytestmark = [pytest.mark.server]


def test_serve_with_judge_openai_clients_and_metrics(workdir, tiny_pair, tmp_path):
    from openai import OpenAI

    target, draft = tiny_pair
    head = write_head(workdir / "heads/server_accept_all", target, torch.zeros(64), bias=20.0)
    port = free_port()
    command = serve_command(
        target, port, spec_config("draft_model", draft),
        {"selfjudge": {"head": str(head), "log_interval_s": 1.0}},
    )
    # The workers' counter files go under VLLM_RPC_BASE_PATH (short: vLLM's IPC sockets go there too).
    rpc_base = Path(tempfile.mkdtemp(prefix="sj"))
    server = Server(command, tmp_path / "server.log",
                    env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_RPC_BASE_PATH": str(rpc_base)})
    try:
        client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        completion = client.completions.create(
            model="tiny", prompt="one two three four", max_tokens=16, temperature=0
        )
        assert completion.usage.completion_tokens == 16
        chat = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "the model token draft"}],
            max_tokens=16,
            temperature=0,
        )
        assert chat.choices[0].message.content is not None
        # Workers publish counters once a second.
        deadline = time.monotonic() + 20
        while True:
            metrics = server.get("/metrics")
            drafts = parse_metric(metrics, "vllm:spec_decode_num_draft_tokens_total")
            judged = parse_metric(metrics, "vllm:spec_decode_selfjudge_draft_tokens_total")
            if judged == drafts or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert drafts > 0 and judged == drafts
        assert "vllm:selfjudge_guard" not in metrics  # no guard section: no shadow, no guard metric
        accepted = parse_metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
        assert parse_metric(metrics, "vllm:spec_decode_selfjudge_judge_accepted_total") == accepted == drafts
        assert parse_metric(metrics, "vllm:spec_decode_selfjudge_judge_deferred_total") == 0
        assert "SelfJudge: draft tokens scored" in server.tail(200_000)
        assert list(rpc_base.glob("selfjudge-metrics-*/worker-0-*.json"))

        # Per-request control through the OpenAI API's vllm_xargs: a lossless request works,
        # an invalid one is an HTTP 400 that names the problem, and the server keeps serving.
        import openai

        lossless = client.completions.create(
            model="tiny", prompt="one two three four", max_tokens=16, temperature=0,
            extra_body={"vllm_xargs": {"selfjudge_enabled": "false"}},
        )
        assert lossless.usage.completion_tokens == 16
        with pytest.raises(openai.BadRequestError, match="selfjudge_threshold"):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                extra_body={"vllm_xargs": {"selfjudge_threshold": 7}},
            )
        assert client.completions.create(model="tiny", prompt="again", max_tokens=4).usage.completion_tokens == 4
    finally:
        pid = server.proc.pid
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    leftovers = list(rpc_base.glob("selfjudge-metrics-*"))  # removed when the server exits
    shutil.rmtree(rpc_base, ignore_errors=True)
    assert not leftovers


@pytest.mark.parametrize(
    "section, message",
    [
        ({"head": "NO_SUCH_HEAD"}, "missing config.json"),
        ({"head": "NO_SUCH_HEAD", "treshold": 0.5}, "Extra inputs are not permitted"),
    ],
)
def test_serve_refuses_to_start_with_a_broken_artifact_or_config(tiny_pair, tmp_path, section, message):
    target, draft = tiny_pair
    section = {k: (str(tmp_path / v) if v == "NO_SUCH_HEAD" else v) for k, v in section.items()}
    command = serve_command(target, free_port(), spec_config("draft_model", draft), {"selfjudge": section})
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
