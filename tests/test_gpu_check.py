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


class _RunnerModule:
    """A stand-in for vllm.v1.worker.gpu.model_runner with 0.34's `sample` signature."""

    @staticmethod
    def make(monkeypatch, name: str):
        import types

        module = types.ModuleType(name)

        class GPUModelRunner:
            _selfjudge_runtime = None  # an engine without the selfjudge section
            model_state = "this engine's model state"

            def sample(self, hidden_states, input_batch, grammar_output):
                return ("sampled", hidden_states, input_batch, grammar_output)

        module.GPUModelRunner = GPUModelRunner
        monkeypatch.setitem(sys.modules, name, module)
        # the probe replaces VerifyStep.judge_chunk_ class-wide: restored after the test
        monkeypatch.setattr(adapter_v2.VerifyStep, "judge_chunk_", adapter_v2.VerifyStep.judge_chunk_)
        return GPUModelRunner


def _plugin_wraps_sample(module_name: str):
    """What the judged engine's worker does at start-up (adapter_v2.install_step_hooks), for `sample`."""
    from selfjudge_vllm.patching import _install

    _install(f"{module_name}:GPUModelRunner.sample", adapter_v2._wrap_sample)


def _sample_runs_through_both(runner_class, probes):
    batch = SimpleNamespace(num_reqs=0, num_draft_tokens=0)
    assert runner_class().sample("hidden", batch, None) == ("sampled", "hidden", batch, None)
    assert runner_class().sample(hidden_states="h", input_batch=batch, grammar_output=None)[1] == "h"
    assert probes.model_state == "this engine's model state"
    assert getattr(runner_class.sample, "__selfjudge_original__", None) is not None  # the "sample wrapped" check
    probes.release()  # between engines (review L5)
    assert probes.model_state is None and probes.runtimes == []


def test_probes_installed_before_the_plugins_wrap_keep_the_signature(monkeypatch):
    """Review H1: the probes go on after the lossless engine, before the judged engine's
    worker wraps `sample`; the plugin reads vLLM's signature through the probe."""
    runner_class = _RunnerModule.make(monkeypatch, "fake_runner_probe_first")
    probes = gpu_check.Probes()
    runner_class.sample = probes.sample(runner_class.sample)
    _plugin_wraps_sample("fake_runner_probe_first")  # raised ValueError before functools.wraps
    _sample_runs_through_both(runner_class, probes)


def test_install_probes_puts_the_plugins_wraps_first_and_the_worker_keeps_the_probes(monkeypatch):
    runner_class = _RunnerModule.make(monkeypatch, "fake_runner_plugin_first")
    probes = gpu_check.install_probes(runner_class, lambda: _plugin_wraps_sample("fake_runner_plugin_first"))
    probe = runner_class.sample
    _plugin_wraps_sample("fake_runner_plugin_first")  # the worker's own call: idempotent
    assert runner_class.sample is probe
    _sample_runs_through_both(runner_class, probes)
    assert adapter_v2.VerifyStep.judge_chunk_.__wrapped__ is not None


def test_forced_drafts_are_accounted_with_one_discarded_step_per_request_and_preemption():
    """Review M1: under async scheduling vLLM discards the output of a step scheduled after the
    one that finished a request (or of a preempted request's in-flight step); the judge forced
    its drafts all the same. The numbers of /tmp/review_mrv2/r6_float16_count_model.py (k=4,
    16 requests, 128 tokens): 1728 forced, 1664 accepted by a correct plugin."""
    assert gpu_check.forced_accounted(1728, 1664, k=4, requests=16, preemptions=0) == (True, 64)
    assert gpu_check.forced_accounted(1728, 1660, k=4, requests=16, preemptions=1) == (True, 68)
    assert not gpu_check.forced_accounted(1728, 1663, k=4, requests=16, preemptions=0)[0]  # a rejected forced draft
    assert not gpu_check.forced_accounted(1728, 1729, k=4, requests=16, preemptions=0)[0]  # accepted what was not forced
    assert not gpu_check.forced_accounted(0, 0, k=4, requests=16, preemptions=0)[0]  # nothing forced: no evidence


def test_the_accept_check_reads_the_accept_all_requests_only():
    """Review M1: the opted-out half's natural acceptances no longer count toward the judged half's."""
    # vLLM 0.34's RequestSpecDecodeMetrics: histogram[j] = verify steps that accepted j drafts
    per_request = [SimpleNamespace(histogram=h) for h in ([0, 0, 1, 0, 2], [2, 1, 0, 0, 0], [0, 0, 0, 0, 3],
                                                         [1, 1, 0, 1, 0])]
    assert gpu_check.accepted_of(per_request, [0, 2]) == 22 and gpu_check.accepted_of(per_request, [1, 3]) == 5
    try:
        gpu_check.accepted_of([None, per_request[0]], [0, 1])
    except RuntimeError as exc:
        assert "[0]" in str(exc)
    else:
        raise AssertionError("missing per-request metrics must fail loudly")


def test_comparisons_use_references_with_the_same_engine_settings_and_report_divergence():
    """Review M2: the preemption run's lossless reference has its max_model_len and KV blocks;
    every engine asks vLLM for per-request spec-decode metrics; divergences name the position."""
    args = gpu_check.parse_args(["--preempt-blocks", "40"])
    reference = gpu_check.engine_kwargs(args, None, **gpu_check.preempt_settings(args))
    judged = gpu_check.engine_kwargs(args, gpu_check.ACCEPT_ALL, **gpu_check.preempt_settings(args))
    assert {k: v for k, v in reference.items() if k != "additional_config"} == \
        {k: v for k, v in judged.items() if k != "additional_config"}
    assert reference["num_gpu_blocks_override"] == 40 and reference["max_model_len"] == 512
    assert judged["per_request_spec_decode_metrics"] == "summary"
    assert gpu_check.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert gpu_check.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert gpu_check.first_divergence([1, 2], [1, 2, 3]) == 2
    assert gpu_check.divergences([[1, 2], [3, 4], [5]], [[1, 2], [3, 9], [6]], [1, 2]) == {1: 1, 2: 0}
