"""Per-request judge control: parsing, policy, per-row thresholds (no engine)."""

from __future__ import annotations

import math

import pytest
import torch

from selfjudge_vllm.artifact import JudgeArtifactConfig, TargetIdentity, threshold_to_logit
from selfjudge_vllm.config import parse_section
from selfjudge_vllm.request_control import JUDGE_OFF, request_options, request_threshold_logit
from selfjudge_vllm.rules import JudgeHead
from selfjudge_vllm.runtime import JudgeRuntime

ARTIFACT = JudgeArtifactConfig(
    target=TargetIdentity(name="t", architecture="A", hidden_size=2, vocab_size=8, num_hidden_layers=1),
    default_threshold=0.5,
    operating_points={"strict": {"threshold": 0.9}, "loose": {"threshold": 0.2}},
)


def resolve(extra, min_threshold=None):
    return request_threshold_logit(request_options(extra), ARTIFACT, 0.5, min_threshold)


def test_request_options():
    assert request_options(None) is None and request_options({"other": 1}) is None
    assert resolve({}) == threshold_to_logit(0.5)
    assert resolve({"selfjudge_enabled": False}) == JUDGE_OFF
    assert resolve({"selfjudge_enabled": "false"}) == JUDGE_OFF  # vllm_xargs strings
    assert resolve({"selfjudge_threshold": 0.8}) == pytest.approx(threshold_to_logit(0.8))
    assert resolve({"selfjudge_operating_point": "strict"}) == pytest.approx(threshold_to_logit(0.9))
    for extra, message in [
        ({"selfjudge_threshold": 1.5}, "selfjudge_threshold: .*between 0 and 1"),
        ({"selfjudge_threshold": "high"}, "selfjudge_threshold"),
        ({"selfjudge_treshold": 0.5}, "selfjudge_treshold: Extra inputs are not permitted"),
        ({"selfjudge_operating_point": "f1"}, "unknown operating point 'f1'; the served judge has: loose, strict"),
        ({"selfjudge_threshold": 0.5, "selfjudge_operating_point": "strict"}, "not both"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve(extra)


def test_server_policy_bounds_loosening():
    assert resolve({"selfjudge_threshold": 0.7}, min_threshold=0.6) == pytest.approx(threshold_to_logit(0.7))
    assert resolve({"selfjudge_enabled": False}, min_threshold=0.6) == JUDGE_OFF  # stricter is fine
    with pytest.raises(ValueError, match="looser than this server allows"):
        resolve({"selfjudge_threshold": 0.3}, min_threshold=0.6)
    with pytest.raises(ValueError, match="looser than this server allows"):
        resolve({"selfjudge_operating_point": "loose"}, min_threshold=0.6)


def _policy(**config):
    from selfjudge_vllm.config import SelfJudgeConfig
    from selfjudge_vllm.request_control import RulePolicy

    return RulePolicy(SelfJudgeConfig(head="h", **config), ARTIFACT, 0.5)


def test_rule_choice_is_bounded_by_the_server():
    from selfjudge_vllm.rules import ENTROPY, JUDGE, LOSSLESS, TOP_ALPHA, RowRule

    only_judge = _policy()
    assert only_judge.for_request(None) == RowRule(JUDGE, 0.0)
    assert only_judge.for_request({"selfjudge_enabled": False}) == LOSSLESS
    with pytest.raises(ValueError, match="'top_alpha' is not served here; this server allows: judge"):
        only_judge.for_request({"selfjudge_rule": "top_alpha"})

    served = _policy(rule="top_alpha", alpha=0.25, request_rules=("judge", "entropy"), min_entropy=1.5)
    assert served.default == RowRule(TOP_ALPHA, math.log(0.25))
    assert served.for_request({"selfjudge_alpha": "0.5"}) == RowRule(TOP_ALPHA, math.log(0.5))
    assert served.for_request({"selfjudge_alpha": 0}).knob == -math.inf  # accept any allowed token
    assert served.for_request({"selfjudge_rule": "entropy"}) == RowRule(ENTROPY, 1.5)
    assert served.for_request({"selfjudge_rule": "entropy", "selfjudge_min_entropy": 3}) == RowRule(ENTROPY, 3.0)
    judged = served.for_request({"selfjudge_rule": "judge", "selfjudge_threshold": 0.8})
    assert judged.rule == JUDGE and judged.knob == pytest.approx(threshold_to_logit(0.8))
    for extra, message in [
        ({"selfjudge_rule": "judge", "selfjudge_alpha": 0.3},
         "selfjudge_alpha belongs to the rule 'top_alpha', not 'judge'"),
        ({"selfjudge_threshold": 0.3}, "selfjudge_threshold belongs to the rule 'judge', not 'top_alpha'"),
        ({"selfjudge_alpha": 1.5}, "selfjudge_alpha: .*less than or equal to 1"),
        ({"selfjudge_rule": "medusa"}, "selfjudge_rule: Input should be 'judge', 'top_alpha', 'entropy' or 'fly'"),
        ({"selfjudge_rule": "fly"}, "'fly' is not served here"),
        ({"selfjudge_rule": "entropy", "selfjudge_min_entropy": -1}, "selfjudge_min_entropy"),
    ]:
        with pytest.raises(ValueError, match=message):
            served.for_request(extra)


def test_training_free_rules_need_no_head():
    from selfjudge_vllm.config import SelfJudgeConfig

    assert SelfJudgeConfig(rule="entropy").head is None
    with pytest.raises(ValueError, match="'head' .* is required for the rule 'judge'"):
        SelfJudgeConfig(rule="entropy", request_rules=("judge",))


def test_step_rules_follow_batch_order_and_draft_counts():
    from selfjudge_vllm.rules import JUDGE, OFF, TOP_ALPHA, RowRule, decide_and_force_

    policy = _policy(request_rules=("top_alpha",))
    head = JudgeHead(torch.ones(2), torch.zeros(1))
    runtime = JudgeRuntime(head, None, 0, policy.default, policy.for_request)
    plain = runtime.step_rules([("a", 2, None), ("b", 3, {})], "cpu")
    assert plain.uniform == RowRule(JUDGE, 0.0) and plain.rule_ids is None  # scalar fast path
    # Request ids are unique and their options never change, so each is resolved once.
    mixed = [("a", 2, None), ("d", 1, {"selfjudge_enabled": False}), ("c", 2, {"selfjudge_threshold": 0.8}),
             ("e", 2, {"selfjudge_rule": "top_alpha", "selfjudge_alpha": 0.5})]
    step = runtime.step_rules(mixed, "cpu")
    assert step.rule_ids.tolist() == [JUDGE, JUDGE, OFF, JUDGE, JUDGE, TOP_ALPHA, TOP_ALPHA]
    assert step.knobs.tolist()[:3] == [0.0, 0.0, math.inf]
    assert step.knobs[3:5].tolist() == pytest.approx([threshold_to_logit(0.8)] * 2)
    # A judged-off row is never accepted, whatever its score; top_alpha rows ignore the head.
    hidden = torch.full((7, 2), 100.0)
    logits = torch.zeros(7, 8)
    logits[5, 0] = 1.0  # row 5: p(draft 5) / p(top-1) = e^-1 < 0.5
    accept, _ = decide_and_force_(step, torch.arange(7), logits, hidden, head)
    assert accept.tolist() == [True, True, False, True, True, False, True]


def test_reasoning_scope_from_the_server_or_the_request():
    from selfjudge_vllm.request_control import RulePolicy

    # Without marker ids (here or from vLLM's reasoning parser) the server cannot start.
    with pytest.raises(ValueError, match="serve with vLLM's --reasoning-parser .* or set selfjudge.reasoning_end"):
        RulePolicy(parse_section({"selfjudge": {"rule": "top_alpha", "scope": "reasoning"}}))
    scoped = RulePolicy(parse_section({"selfjudge": {"rule": "top_alpha", "scope": "reasoning",
                                                     "reasoning_end_token_id": 9, "reasoning_start_token_id": 7}}))
    assert (scoped.default.reasoning_end, scoped.default.reasoning_start) == (9, 7)
    assert scoped.for_request({"selfjudge_scope": "all"}).reasoning_end is None
    assert scoped.for_request({"selfjudge_alpha": 0.2}).reasoning_end == 9
    plain = RulePolicy(parse_section({"selfjudge": {"rule": "top_alpha", "reasoning_end_token_id": 9}}))
    assert plain.default.reasoning_end is None
    assert plain.for_request({"selfjudge_scope": "reasoning"}).reasoning_end == 9
    unconfigured = RulePolicy(parse_section({"selfjudge": {"rule": "top_alpha"}}))
    with pytest.raises(ValueError, match="needs the token that ends the reasoning"):
        unconfigured.for_request({"selfjudge_scope": "reasoning"})
    with pytest.raises(ValueError, match="selfjudge_scope"):
        unconfigured.for_request({"selfjudge_scope": "answer"})


def test_reasoning_markers_come_from_the_section_or_vllms_reasoning_parser():
    from types import SimpleNamespace

    from selfjudge_vllm.config import ConfigError
    from selfjudge_vllm.factories import with_reasoning_markers

    def served(start, end, enabled=True):
        return SimpleNamespace(reasoning_config=SimpleNamespace(
            enabled=enabled, reasoning_parser="deepseek_r1", reasoning_start_token_ids=start,
            natural_reasoning_end_token_ids=end))

    section = parse_section({"selfjudge": {"rule": "top_alpha", "scope": "reasoning"}})
    resolved = with_reasoning_markers(section, served([7], [9]))
    assert (resolved.reasoning_start_token_id, resolved.reasoning_end_token_id) == (7, 9)
    assert with_reasoning_markers(section, served(None, [9])).reasoning_start_token_id is None
    # Ids in the section win; no parser (or one vLLM could not resolve) leaves them unset.
    given = parse_section({"selfjudge": {"rule": "top_alpha", "scope": "reasoning", "reasoning_end_token_id": 3}})
    assert with_reasoning_markers(given, served([7], [9])).reasoning_end_token_id == 3
    assert with_reasoning_markers(section, served([7], [9], enabled=False)).reasoning_end_token_id is None
    assert with_reasoning_markers(section, SimpleNamespace(reasoning_config=None)).reasoning_end_token_id is None
    with pytest.raises(ConfigError, match="'deepseek_r1' marks reasoning with several tokens"):
        with_reasoning_markers(section, served([7], [9, 10]))


def test_persistent_rule_table_equals_a_fresh_build_step_after_step():
    """The request table (slots written when a request is added or its rule changes, one
    staged copy per step) gives every step the same rows as building them from scratch,
    while requests arrive, leave, change rule (a reasoning span closing) and outnumber the
    table's first capacity."""
    import random
    from dataclasses import fields, replace

    from selfjudge_vllm.rules import ENTROPY, LOSSLESS, RowRule, StepRules
    from selfjudge_vllm.runtime import RequestRuleTable

    rng = random.Random(7)
    choices = [LOSSLESS, RowRule.top_alpha(0.5), RowRule.top_alpha(0.2), RowRule(ENTROPY, 1.0),
               RowRule.named("fly", 0.3), replace(RowRule.top_alpha(0.3), reasoning_end=5)]
    table = RequestRuleTable("cpu", capacity=4)
    live: dict[str, RowRule] = {}
    for step_index in range(60):
        for req_id in [r for r in live if rng.random() < 0.2]:
            del live[req_id]
        for _ in range(rng.randrange(0, 4)):
            live[f"r{step_index}-{len(live)}"] = rng.choice(choices)
        for req_id in [r for r in live if rng.random() < 0.1]:
            live[req_id] = rng.choice(choices)  # e.g. a span closing: the request turns lossless
        batch = list(live)
        rng.shuffle(batch)  # vLLM reorders its batch as requests finish
        counts = [rng.randrange(0, 5) for _ in batch]
        for req_id in batch:
            table.set(req_id, live[req_id])
        table.keep_only(live)
        staged = table.step(batch, counts)
        fresh = StepRules.build([(live[r], c) for r, c in zip(batch, counts)], "cpu")
        for field in fields(StepRules):
            got, want = getattr(staged, field.name), getattr(fresh, field.name)
            assert (torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want), field.name
    assert len(live) > 4  # the table grew past its first capacity


def _chunk_rules(table, chunks):
    """Stage each chunk of one step (model runner V2 verifies a step chunk by chunk)."""
    staged = []
    for chunk in chunks:
        for req_id, rule, _ in chunk:
            table.set(req_id, rule)
        staged.append(table.step([r for r, _, _ in chunk], [c for _, _, c in chunk]))
    return staged


def _assert_chunks_equal_fresh_builds(staged, chunks, device):
    from dataclasses import fields

    from selfjudge_vllm.rules import StepRules

    for got_rules, chunk in zip(staged, chunks):
        want_rules = StepRules.build([(rule, count) for _, rule, count in chunk], device)
        for field in fields(StepRules):
            got, want = getattr(got_rules, field.name), getattr(want_rules, field.name)
            assert (torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want), field.name


def _three_chunk_step(step_index):
    from selfjudge_vllm.rules import ENTROPY, LOSSLESS, RowRule

    mixed = [RowRule.top_alpha(0.1 * (step_index + 1)), RowRule(ENTROPY, 1.0 + step_index), LOSSLESS,
             RowRule.named("fly", 0.3)]
    return [[(f"s{step_index}-c{c}-r{r}", mixed[(c + r) % 4], 1 + (c * 3 + r + step_index) % 4) for r in range(3)]
            for c in range(4)]


def test_the_rule_table_stages_each_chunk_of_a_step_on_its_own():
    """Issue 43: model runner V2 stages one table per verification chunk; with three or more
    chunks in a step every chunk keeps its own values (checked after the whole step was
    staged, so a staging buffer shared between chunks would show)."""
    from selfjudge_vllm.runtime import RequestRuleTable

    table = RequestRuleTable("cpu", capacity=4)
    for step_index in range(3):
        chunks = _three_chunk_step(step_index)
        staged = _chunk_rules(table, chunks)
        _assert_chunks_equal_fresh_builds(staged, chunks, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the host waits only there")
def test_staging_four_chunks_never_waits_for_the_device():
    """On CUDA the host must not wait for the device while it stages a step's chunks (the
    previous pair of staging buffers made the third chunk wait for the first chunk's copy,
    which sits behind everything queued before it)."""
    import time

    from selfjudge_vllm.runtime import RequestRuleTable

    table = RequestRuleTable("cuda", capacity=4)
    _chunk_rules(table, _three_chunk_step(0))  # warm the caching host allocator
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~0.1 s or more of device work queued ahead of the copies
    started = time.perf_counter()
    chunks = _three_chunk_step(1)
    staged = _chunk_rules(table, chunks)
    elapsed = time.perf_counter() - started
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy and elapsed < 0.05, (busy, elapsed)
    _assert_chunks_equal_fresh_builds(staged, chunks, "cuda")


def test_memory_profiling_runs_the_judges_vocabulary_wide_work_in_chunks(monkeypatch):
    """During vLLM's profiling run the judge does its vocabulary-wide work (logit features'
    log-softmax, entropy's softmax) on the dummy rows, chunk by chunk, and changes nothing;
    outside profiling an unmatched call does none of it."""
    from selfjudge_vllm import features
    from selfjudge_vllm.rules import RowRule

    monkeypatch.setitem(features.CHUNK_ELEMENTS, "cpu", 2 * 50)  # two rows of 50 per chunk
    seen = []
    for name in ("softmax", "log_softmax"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, *a, _f=original, _n=name, **k: seen.append((_n, x.shape[0]))
                            or _f(x, *a, **k))
    runtime = JudgeRuntime(None, None, 0, RowRule.top_alpha(0.5))
    logits = torch.randn(5, 50)
    before = logits.clone()
    assert runtime.judge_(torch.zeros(5, dtype=torch.long), logits) is False
    assert seen == [] and runtime.counters.unmatched_calls == 1
    runtime.profiling = True
    assert runtime.judge_(torch.zeros(5, dtype=torch.long), logits) is False
    assert sorted(seen) == sorted([("log_softmax", 2), ("log_softmax", 2), ("log_softmax", 1),
                                   ("softmax", 2), ("softmax", 2), ("softmax", 1)])
    assert runtime.profiled_rows == 5 and runtime.counters.unmatched_calls == 1
    assert torch.equal(logits, before)
