"""Hot-path defects a review of the plugin against vLLM found (issue 30): each test failed on
the code before its fix."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from selfjudge_vllm.config import ConfigError, parse_section
from selfjudge_vllm.factories import load_served_policy, with_reasoning_markers
from selfjudge_vllm.patching import UnsupportedConfiguration
from selfjudge_vllm.rules import LOSSLESS, RowRule, StepRules, decide_and_force_
from selfjudge_vllm.runtime import JudgeRuntime, PendingStep, reasoning_span
from selfjudge_vllm.vllm_patches import check_serving_configuration

END, START = 9, 8
SCOPED = RowRule(RowRule.named("top_alpha", 0.0).rule, -math.inf, END, None)


def test_the_reasoning_span_waits_for_placeholders_async_scheduling_leaves():
    """vLLM's async scheduling leaves -1 placeholders at the end of a request's output token
    list; the span must not read past them, or it skips the end marker once resolved."""
    rule = RowRule(SCOPED.rule, SCOPED.knob, END, None)
    span = reasoning_span(rule, (), [3, 4, -1], None)
    assert span == (2, True)
    # The placeholder resolved to the end marker, and a new placeholder follows.
    assert reasoning_span(rule, (), [3, 4, END, -1], span) == (3, False)


def test_the_reasoning_span_reads_a_shortened_token_list_from_its_end():
    rule = RowRule(SCOPED.rule, SCOPED.knob, END, START)
    span = reasoning_span(rule, (START,), [1, 2, 3, 4, 5], None)
    assert span == (5, True)
    # vLLM dropped tokens (a KV-load failure: gpu_model_runner shortens the list); the
    # tokens written after them are read.
    span = reasoning_span(rule, (START,), [1, 2], span)
    assert span == (2, True)
    assert reasoning_span(rule, (START,), [1, 2, END], span) == (3, False)


def test_a_finished_request_leaves_no_rule_or_span_state_behind():
    runtime = JudgeRuntime(None, None, 0.0, RowRule(SCOPED.rule, SCOPED.knob, END, None))
    runtime.step_rules([("a", 2, None, ((), [1, END]))], "cpu", prune=False)
    assert runtime._spans["a"][1] is False
    runtime.forget("a")
    assert "a" not in runtime._spans and "a" not in runtime._rules_by_request
    # Resubmitted under the same id: it starts fresh, inside its span.
    runtime.step_rules([("a", 2, None, ((), [1]))], "cpu", prune=False)
    assert runtime._spans["a"] == (1, True)


def _served(start, end):
    return SimpleNamespace(reasoning_config=SimpleNamespace(
        enabled=True, reasoning_parser="deepseek_r1", reasoning_start_token_ids=start,
        natural_reasoning_end_token_ids=end), scheduler_config=SimpleNamespace(async_scheduling=False))


def test_reasoning_scope_is_refused_under_async_scheduling_at_start_up_and_per_request():
    section = parse_section({"selfjudge": {"rule": "top_alpha", "scope": "reasoning", "reasoning_end_token_id": END}})
    vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(method="draft_model"), use_v2_model_runner=False,
                                  scheduler_config=SimpleNamespace(async_scheduling=True), reasoning_config=None)
    with pytest.raises(UnsupportedConfiguration, match="--no-async-scheduling"):
        check_serving_configuration(vllm_config, section)
    vllm_config.scheduler_config.async_scheduling = False
    check_serving_configuration(vllm_config, section)
    # Scope 'all' by default, a request asks for the reasoning scope: HTTP 400 under async.
    default_all = parse_section({"selfjudge": {"rule": "top_alpha", "reasoning_end_token_id": END}})
    vllm_config.scheduler_config.async_scheduling = True
    policy, _ = load_served_policy(default_all, vllm_config)
    assert policy.for_request({"selfjudge_alpha": 0.3}).reasoning_end is None
    with pytest.raises(ValueError, match="--no-async-scheduling"):
        policy.for_request({"selfjudge_scope": "reasoning"})


def test_multi_token_reasoning_markers_refuse_only_where_the_scope_is_asked_for():
    scope_all = parse_section({"selfjudge": {"rule": "top_alpha"}})
    served = _served([7], [9, 10])
    assert with_reasoning_markers(scope_all, served).reasoning_end_token_id is None  # starts
    policy, _ = load_served_policy(scope_all, served)
    assert policy.for_request({}) == policy.default
    with pytest.raises(ValueError, match="marks reasoning with several tokens"):
        policy.for_request({"selfjudge_scope": "reasoning"})
    with pytest.raises(ConfigError, match="marks reasoning with several tokens"):
        load_served_policy(parse_section({"selfjudge": {"rule": "top_alpha", "scope": "reasoning"}}), served)


def test_a_relaxed_rule_never_overrides_the_targets_own_decision_to_end_reasoning():
    """A scoped row whose processed top choice is the end marker is verified exactly, so an
    accept-all rule cannot prolong the reasoning where the target would stop."""
    vocab = 12
    logits = torch.zeros(4, vocab)
    logits[:, 3] = 1.0
    logits[2, END] = 5.0  # the target would end its reasoning at the third draft row
    drafts = torch.tensor([1, 2, 4, 5])
    scoped = RowRule(RowRule.named("top_alpha", 0.0).rule, -math.inf, END, None)
    accept, _ = decide_and_force_(StepRules.build([(scoped, 4)], "cpu"), drafts, logits.clone())
    assert accept.tolist() == [True, True, False, True]
    # Without a scope the same rule accepts the row.
    unscoped = RowRule(scoped.rule, scoped.knob)
    accept, _ = decide_and_force_(StepRules.build([(unscoped, 4), (LOSSLESS, 0)], "cpu"), drafts, logits.clone())
    assert accept.tolist() == [True, True, True, True]


def test_forced_entries_are_written_back_once_verification_has_read_them():
    """In vLLM's processed-logprobs modes the logprobs users get are computed from the
    processed logits after verification: the forced entries must be the target's again."""
    from selfjudge_vllm import adapter_v1

    drafts = torch.tensor([2, 3, 1])
    logits = torch.randn(3, 6)
    before = logits.clone()
    runtime = JudgeRuntime(None, None, 0.0, RowRule.named("top_alpha", 0.0))
    seen = {}

    def verification(draft_token_ids, target_logits):
        seen["forced"] = target_logits.clone()
        return "verified"

    runtime.pending = PendingStep(torch.zeros(4, 2), None, drafts, torch.arange(3),
                                  StepRules(RowRule.named("top_alpha", 0.0), present=frozenset({2})))
    adapter_v1._active_runtime = runtime
    try:
        assert adapter_v1._wrap_rejection_sample(verification)(drafts, logits) == "verified"
    finally:
        adapter_v1._active_runtime = None
    assert (seen["forced"][torch.arange(3), drafts] == 1e30).all()  # verification saw the force
    assert torch.equal(logits, before)  # and the caller gets the target's logits back
