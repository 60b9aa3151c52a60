"""benchmarks/gpu_check.py: what can be checked without a GPU and without vLLM 0.34 (the
script itself runs on a GPU machine with vLLM 0.34.0 only; docs/vllm-integration.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks import gpu_check
from selfjudge_vllm import adapter_v2
from selfjudge_vllm.config import parse_section
from selfjudge_vllm.rules import RowRule
from selfjudge_vllm.runtime import JudgeRuntime

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_help_runs_without_vllm_or_a_gpu():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for word in ("--model", "preempt", "float16", "set_sync_debug_mode"):
        assert word in proc.stdout, word


def test_engine_settings_serve_the_judge_with_graphs_and_async_scheduling():
    args = gpu_check.parse_args(["--model", "m", "--k", "3"])
    judged = gpu_check.engine_kwargs(args, gpu_check.ACCEPT_ALL, dtype="float16")
    assert judged["enforce_eager"] is False and judged["async_scheduling"] is True
    assert judged["speculative_config"]["num_speculative_tokens"] == 3 and judged["dtype"] == "float16"
    config = parse_section(judged["additional_config"])  # the section a worker would parse
    assert config.enabled and config.rule == "top_alpha" and config.allow_unsupported_vllm
    assert gpu_check.engine_kwargs(args, None)["additional_config"] == {}  # the lossless reference
    assert len(set(gpu_check.prompts(8))) == 8


def test_counters_outputs_and_the_report(tmp_path):
    metrics = [SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=7.0),
               SimpleNamespace(name="vllm:num_preemptions", value=2.0)]
    assert gpu_check.counter(metrics, "vllm:spec_decode_num_accepted_tokens") == 7
    assert gpu_check.counter(metrics, "vllm:absent") == 0
    assert gpu_check.differing([[1, 2], [3], [4]], [[1, 2], [3, 5], [0]]) == [1, 2]
    assert gpu_check.differing([[1, 2], [3], [4]], [[1, 2], [3, 5], [0]], [0, 2]) == [2]
    report = gpu_check.Report()
    assert report.check("a", True, x=1) and not report.check("b", [], y=2)
    report.write(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == ["b"] == report.failed


def test_the_probes_compare_hidden_rows_with_the_logits_and_collect_the_runtimes():
    """The per-chunk probe around the plugin's VerifyStep (CPU): the argmax of logits
    recomputed from the kept hidden rows equals vLLM's logits when the rows line up, and is
    counted when they do not; the judge's counters are read from the runtimes it saw."""
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.randn(8, 32, generator=gen)
    hidden = torch.randn(7, 8, generator=gen)
    cu = np.array([0, 3, 7])  # two requests: 2 and 3 drafts
    probes = gpu_check.Probes(model_state=SimpleNamespace(compute_sample_logits=lambda h: h @ lm_head))
    judge_chunk_ = probes.judge_chunk(adapter_v2.VerifyStep.judge_chunk_)
    for raw, mismatched in ((hidden @ lm_head, False), ((hidden @ lm_head).roll(1, 0), True)):
        runtime = JudgeRuntime(None, None, 0.0, RowRule.named("top_alpha", 0.0))
        step = adapter_v2.VerifyStep(runtime, hidden, torch.arange(7), cu, [("a", 2, None), ("b", 3, None)], raw)
        draft_sampled = torch.tensor([1, 4, 5, 2, 6, 7, 9])
        judge_chunk_(step, raw.clone(), draft_sampled)
        assert (probes.argmax_mismatches() > 0) == mismatched
        assert probes.counters().judge_accepted == 5 and probes.counters().draft_tokens == 5
        probes.runtimes.clear()
        probes.mismatches.clear()
    assert probes.chunks == 2 and not probes.sync_errors
