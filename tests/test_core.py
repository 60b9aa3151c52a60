"""The pure core: artifact schema and I/O, the selfjudge config section, the acceptance rule.
No vLLM engine here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfjudge_vllm.artifact import (
    ArtifactError,
    JudgeArtifact,
    JudgeArtifactConfig,
    TargetIdentity,
    check_target_matches,
    threshold_to_logit,
)
from selfjudge_vllm.config import ConfigError, parse_section
from selfjudge_vllm.rules import FORCED_LOGIT, JUDGE, JudgeHead, RowRule, StepRules, decide_and_force_

TARGET = TargetIdentity(
    name="tiny", architecture="LlamaForCausalLM", hidden_size=8, vocab_size=32, num_hidden_layers=2
)


def _artifact(weight=None, bias=0.0, **overrides):
    config = JudgeArtifactConfig(
        target=TARGET,
        default_threshold=overrides.pop("default_threshold", 0.5),
        operating_points=overrides.pop("operating_points", {"youden": {"threshold": 0.3}}),
        provenance={"seed": 1},
    )
    weight = torch.arange(8, dtype=torch.float32) if weight is None else weight
    return JudgeArtifact(config, weight, torch.tensor([bias]))


def test_artifact_round_trips_without_pickle(tmp_path):
    original = _artifact(bias=-0.25)
    original.save(tmp_path / "head")
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert files == ["config.json", "model.safetensors"]
    loaded = JudgeArtifact.load(tmp_path / "head")
    assert loaded.config == original.config
    assert torch.equal(loaded.weight, original.weight)
    assert torch.equal(loaded.bias, original.bias)
    assert json.loads((tmp_path / "head/config.json").read_text())["format_version"] == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "missing config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 40), "unreadable"),
        (
            lambda d: _edit_config(d, lambda c: c.update(surprise=1)),
            "Extra inputs are not permitted",
        ),
        (lambda d: _edit_config(d, lambda c: c.update(format_version=9)), "format_version"),
        (lambda d: _edit_config(d, lambda c: c.update(default_threshold=1.0)), "between 0 and 1"),
        (
            lambda d: _edit_config(d, lambda c: c["target"].update(hidden_size=16)),
            "hidden_size=16",
        ),
    ],
)
def test_damaged_artifacts_fail_with_a_clear_error(tmp_path, damage, message):
    _artifact().save(tmp_path / "head")
    damage(tmp_path / "head")
    with pytest.raises(ArtifactError, match=message):
        JudgeArtifact.load(tmp_path / "head")


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.zeros(8)
    weight[3] = bad
    with pytest.raises(ArtifactError, match="NaN or infinity"):
        _artifact(weight=weight)


def test_artifact_for_another_model_is_refused():
    other = TARGET.model_copy(update={"name": "renamed-but-same"})
    check_target_matches(_artifact().config, other)  # a different name alone is fine
    bigger = TARGET.model_copy(update={"num_hidden_layers": 4, "name": "other"})
    with pytest.raises(ArtifactError, match="num_hidden_layers: artifact 2, served 4"):
        check_target_matches(_artifact().config, bigger)


def test_threshold_resolution():
    artifact = _artifact()
    assert artifact.resolve_threshold(None, None) == 0.5
    assert artifact.resolve_threshold(0.9, None) == 0.9
    assert artifact.resolve_threshold(None, "youden") == 0.3
    with pytest.raises(ArtifactError, match="unknown operating point 'f1'; this artifact has: youden"):
        artifact.resolve_threshold(None, "f1")
    with pytest.raises(ValueError, match="between 0 and 1"):
        artifact.resolve_threshold(0.0, None)


def test_config_section():
    assert parse_section({}) is None
    assert parse_section(None) is None
    off = parse_section({"selfjudge": {"enabled": False}})
    assert off is not None and not off.enabled
    on = parse_section({"selfjudge": {"head": "/x", "threshold": 0.7}})
    assert on.enabled and on.threshold == 0.7
    for section, message in [
        ({"head": "/x", "thresold": 0.7}, "Extra inputs are not permitted"),
        ({"head": "/x", "threshold": 1.5}, "between 0 and 1"),
        ({"head": "/x", "threshold": 0.0}, "between 0 and 1"),
        ({}, "'head'"),
        ({"head": "/x", "threshold": 0.5, "operating_point": "youden"}, "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_section({"selfjudge": section})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_section({"selfjudge": "on"})


def test_threshold_to_logit_matches_sigmoid():
    for t in (0.01, 0.3, 0.5, 0.77, 0.999):
        z = threshold_to_logit(t)
        assert math.isclose(1 / (1 + math.exp(-z)), t, rel_tol=1e-12)


def test_judge_decisions_and_forcing_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 12, 8, 32
    hidden = torch.randn(n, hidden_size, generator=gen).to(torch.bfloat16)
    weight = torch.randn(hidden_size, generator=gen)
    head = JudgeHead(weight, torch.tensor([0.1]))
    drafts = torch.randint(0, vocab, (n,), generator=gen)
    drafts[2] = -1  # padding
    logits = torch.randn(n, vocab, generator=gen)
    logits[5, drafts[5]] = float("-inf")  # banned / grammar-forbidden
    before = logits.clone()

    step = StepRules.build([(RowRule(JUDGE, threshold_to_logit(0.5)), n)], "cpu")
    accept, valid = decide_and_force_(step, drafts, logits, hidden, head)
    assert valid.tolist() == [i != 2 for i in range(n)]
    # Direct computation in float64, row by row.
    expected = []
    for i in range(n):
        score = float(hidden[i].double() @ weight.double()) + 0.1
        ok = score >= 0.0 and drafts[i] >= 0 and before[i, drafts[i]] != float("-inf")
        expected.append(bool(ok))
    assert accept.tolist() == expected
    assert any(expected) and not all(expected)

    probs = torch.softmax(logits, -1)
    for i in range(n):
        if expected[i]:
            assert probs[i, drafts[i]] == 1.0
            assert logits[i].argmax() == drafts[i]
            changed = (logits[i] != before[i]).nonzero().flatten().tolist()
            assert changed == [int(drafts[i])] and logits[i, drafts[i]] == FORCED_LOGIT
        else:
            assert torch.equal(logits[i], before[i])  # untouched: standard verification


def test_per_row_thresholds_and_ties():
    head = JudgeHead(torch.ones(2), torch.zeros(1))
    hidden = torch.tensor([[1.0, 1.0], [0.5, 0.5], [-1.0, 0.0]])  # scores 2, 1, -1
    drafts = torch.tensor([0, 1, 2])
    uniform = StepRules.build([(RowRule(JUDGE, 0.0), 3)], "cpu")
    assert uniform.uniform is not None and uniform.rule_ids is None  # no per-row tensors
    assert decide_and_force_(uniform, drafts, torch.zeros(3, 4), hidden, head)[0].tolist() == [True, True, False]
    per_row = StepRules.build([(RowRule(JUDGE, 2.0), 1), (RowRule(JUDGE, 1.5), 1), (RowRule(JUDGE, -1.0), 1)], "cpu")
    accept, _ = decide_and_force_(per_row, drafts, torch.zeros(3, 4), hidden, head)
    assert accept.tolist() == [True, False, True]  # ties accept


def test_cli_inspect(tmp_path, capsys):
    from selfjudge_vllm.cli import main

    _artifact().save(tmp_path / "head")
    assert main(["inspect", str(tmp_path / "head")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM, hidden 8" in out and "operating point youden: threshold 0.3000" in out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "missing config.json" in capsys.readouterr().err


def test_runtime_judges_only_its_own_step_and_fails_loudly_otherwise():
    from selfjudge_vllm.runtime import JudgeNotAppliedError, JudgeRuntime

    head = JudgeHead(torch.ones(2), torch.zeros(1))
    runtime = JudgeRuntime(head, sink=None, log_interval_s=0, default_rule=RowRule(JUDGE, 0.0))
    # Rows: [draft0 verify, draft1 verify, bonus]; features of draft i are row i + 1.
    hidden = torch.tensor([[9.0, 9.0], [1.0, 1.0], [-1.0, -1.0]])
    drafts = torch.tensor([3, 2])
    indices = torch.tensor([0, 1])
    logits = torch.zeros(2, 4)

    runtime.begin_step(hidden, drafts, indices)
    assert not runtime.judge_(drafts.clone(), logits)  # another tensor: not this step's
    with pytest.raises(JudgeNotAppliedError, match="silently off"):
        runtime.end_step()

    runtime.begin_step(hidden, drafts, indices)
    assert runtime.judge_(drafts, logits)
    runtime.end_step()
    assert logits[0, 3] == FORCED_LOGIT and torch.equal(logits[1], torch.zeros(4))
    counters = runtime.flush()
    assert (counters.draft_tokens, counters.judge_accepted, counters.steps_judged) == (2, 1, 1)
    assert counters.unmatched_calls == 1


def test_publisher_logs_counts_that_changed_since_its_last_line():
    import logging
    import time

    from selfjudge_vllm.runtime import JudgeRuntime

    head = JudgeHead(torch.ones(2), torch.zeros(1))
    runtime = JudgeRuntime(head, sink=None, log_interval_s=0.3, default_rule=RowRule(JUDGE, 0.0))
    runtime.begin_step(torch.ones(2, 2), torch.tensor([1]), torch.tensor([0]))
    runtime.judge_(runtime.pending.draft_token_ids, torch.zeros(1, 4))
    runtime.end_step()  # counts change before the first log is due

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    # Attached directly: once vLLM is imported, its "vllm" logger does not propagate.
    judge_logger, handler = logging.getLogger("vllm.selfjudge"), Collect()
    previous_level = judge_logger.level
    judge_logger.addHandler(handler)
    judge_logger.setLevel(logging.INFO)
    try:
        runtime.start_publisher(publish_interval_s=0.1)
        time.sleep(1.0)
    finally:
        judge_logger.removeHandler(handler)
        judge_logger.setLevel(previous_level)
    lines = [line for line in handler.lines if "SelfJudge:" in line]
    assert len(lines) == 1 and "draft tokens scored: 1" in lines[0]


def test_training_free_rules_against_a_direct_computation():
    """top_alpha and entropy decisions, row by row in float64, on a mixed batch."""
    from selfjudge_vllm.rules import ENTROPY, TOP_ALPHA

    gen = torch.Generator().manual_seed(3)
    vocab, counts = 6, [4, 3, 5, 4]
    n = sum(counts)
    logits = torch.randn(n, vocab, generator=gen) * 1.5
    drafts = torch.randint(0, vocab, (n,), generator=gen)
    # Make the target agree with about half the drafts, so windows both pass and fail.
    agree = torch.rand(n, generator=gen) < 0.6
    logits[agree, drafts[agree]] = logits[agree].max(-1).values + 0.5
    drafts[7] = -1
    logits[2, drafts[2]] = float("-inf")
    rules = [RowRule.top_alpha(0.3), RowRule(ENTROPY, 1.2), RowRule(ENTROPY, 0.8), RowRule.top_alpha(0.6)]
    window = 2
    before = logits.clone()
    accept, _ = decide_and_force_(StepRules.build(zip(rules, counts), "cpu"), drafts, logits, entropy_window=window)

    expected, row = [], 0
    for rule, count in zip(rules, counts):
        for i in range(count):
            z = before[row].double()
            p = torch.softmax(z, 0)
            d = int(drafts[row])
            ok = d >= 0 and z[d] != float("-inf")
            if rule.rule == TOP_ALPHA:
                ok = ok and p[d] >= math.exp(rule.knob) * p.max()
            else:
                entropy = -sum(float(q) * math.log(float(q)) for q in p if q > 0)
                later = range(row + 1, row + 1 + min(window, count - 1 - i))
                agrees = all(int(before[j].argmax()) == int(drafts[j]) for j in later)
                ok = ok and entropy >= rule.knob and i < count - 1 and agrees
            expected.append(bool(ok))
            row += 1
    assert accept.tolist() == expected
    assert 3 <= sum(expected) <= n - 3  # the case exercises both outcomes
    for i in range(n):
        forced = logits[i] != before[i]
        assert forced.any().item() == expected[i]


def test_judge_only_step_does_no_vocabulary_wide_work():
    """The judge-only step never touches a row's vocabulary beyond the draft entry."""

    head = JudgeHead(torch.ones(2), torch.zeros(1))
    step = StepRules.build([(RowRule(JUDGE, 0.0), 2)], "cpu")
    logits = torch.zeros(2, 4)
    calls = []
    original_max, original_softmax = torch.Tensor.max, torch.softmax
    try:
        torch.Tensor.max = lambda *a, **k: calls.append("max") or original_max(*a, **k)
        torch.softmax = lambda *a, **k: calls.append("softmax") or original_softmax(*a, **k)
        decide_and_force_(step, torch.tensor([1, 2]), logits, torch.ones(2, 2), head)
    finally:
        torch.Tensor.max, torch.softmax = original_max, original_softmax
    assert calls == []


def test_logit_features_match_a_float64_log_softmax_reference():
    """features.evidence_from_logits against a row-by-row float64 computation: chunked rows
    (more rows than one chunk), a masked (-inf) entry, padding, the bonus row as the last
    draft's next row."""
    from selfjudge_vllm import features

    torch.manual_seed(3)
    rows, vocab = features.CHUNK_ELEMENTS["cpu"] // 50_000 + 7, 50_000
    logits = torch.randn(rows, vocab) * 3
    logits[5, 7] = float("-inf")
    verify_rows = torch.arange(0, rows - 1, 2)  # each verify row's next row exists
    drafts = torch.randint(0, vocab, (len(verify_rows),))
    drafts[0] = -1
    got = features.evidence_from_logits(logits, verify_rows, drafts)
    assert got.shape == (len(verify_rows), 3) and got.dtype == torch.float32
    lp = torch.log_softmax(logits.double(), -1)
    for j, (row, draft) in enumerate(zip(verify_rows.tolist(), drafts.tolist())):
        expected = features.evidence_from_logprobs(
            float(lp[row, max(draft, 0)]), float(lp[row].max()), float(lp[row + 1].max()))
        for k, name in enumerate(features.LOGIT_FEATURES):
            assert abs(float(got[j, k]) - expected[name]) < 1e-5, (j, name)
    # A subset of the features comes back in the asked order.
    sub = features.evidence_from_logits(logits, verify_rows, drafts, (features.NEXT_CONFIDENCE, features.DRAFT_LOGRATIO))
    assert torch.equal(sub, got[:, [2, 0]])


def test_head_with_logit_features_scores_one_dot_product_plus_scalars():
    weight, scalar = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0, -1.0])
    head = JudgeHead(weight, torch.tensor([0.25]), scalar, ("draft_logratio", "verify_confidence", "next_confidence"))
    hidden = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.bfloat16)
    evidence = torch.tensor([[-1.0, -0.5, -0.1], [0.0, 0.0, -2.0]])
    expected = hidden.float() @ weight + evidence @ scalar + 0.25
    assert torch.allclose(head.judge_logits(hidden, evidence), expected)
    logits_only = JudgeHead(None, torch.tensor([0.0]), scalar, ("draft_logratio", "verify_confidence", "next_confidence"))
    assert torch.allclose(logits_only.judge_logits(None, evidence), evidence @ scalar)
    with pytest.raises(ValueError, match="one entry per logit feature"):
        JudgeHead(weight, torch.tensor([0.0]), scalar, ("draft_logratio",))


def test_format2_artifact_round_trips_and_refuses_features_it_cannot_compute(tmp_path):
    config = JudgeArtifactConfig(target=TARGET, default_threshold=0.5, format_version=2,
                                 features=("draft_logratio", "next_confidence"))
    JudgeArtifact(config, None, torch.tensor([0.5]), torch.tensor([1.0, -1.0])).save(tmp_path / "v2")
    loaded = JudgeArtifact.load(tmp_path / "v2")
    assert loaded.weight is None and torch.equal(loaded.scalar_weight, torch.tensor([1.0, -1.0]))
    assert loaded.config.logit_features == ("draft_logratio", "next_confidence")
    _edit_config(tmp_path / "v2", lambda c: c.update(features=["draft_logratio", "attention_entropy"]))
    with pytest.raises(ArtifactError, match="attention_entropy.*upgrade selfjudge-vllm"):
        JudgeArtifact.load(tmp_path / "v2")
    _edit_config(tmp_path / "v2", lambda c: c.update(features=["draft_logratio", "next_confidence"], format_version=1))
    with pytest.raises(ArtifactError, match="need format_version 2"):
        JudgeArtifact.load(tmp_path / "v2")
    _edit_config(tmp_path / "v2", lambda c: c.update(format_version=2, feature_set_version=9))
    with pytest.raises(ArtifactError, match="feature set v9"):
        JudgeArtifact.load(tmp_path / "v2")


def test_judge_step_benchmark_decisions_match_its_float64_reference_on_cpu():
    """benchmarks/judge_step_cuda.py's decision check (hidden, logits and both heads against
    a float64 computation of the head's score from the definitions) passes on the CPU, so the
    GPU figures it reports rest on a checked computation."""
    from benchmarks import judge_step_cuda

    assert judge_step_cuda.main(["--cpu-check", "--requests", "6", "--drafts", "3", "--hidden", "32",
                                 "--vocab", "700", "--repeats", "1"]) == 0


def test_entropy_is_computed_on_the_entropy_requests_rows_only():
    """In a mixed step, the vocabulary-wide softmax sees only the rows of requests using
    the entropy rule, and the decisions equal the same requests served alone."""
    from selfjudge_vllm.rules import ENTROPY

    gen = torch.Generator().manual_seed(5)
    counts = [3, 4, 2]
    rules = [RowRule.top_alpha(0.5), RowRule(ENTROPY, 0.5), RowRule.top_alpha(0.2)]
    logits = torch.randn(sum(counts), 50, generator=gen)
    drafts = logits.argmax(-1)
    drafts[4] = (drafts[4] + 1) % 50
    seen = []
    original = torch.softmax
    torch.softmax = lambda x, *a, **k: seen.append(x.shape[0]) or original(x, *a, **k)
    try:
        mixed, _ = decide_and_force_(StepRules.build(zip(rules, counts), "cpu"), drafts, logits.clone())
    finally:
        torch.softmax = original
    assert sum(seen) == 4  # the entropy request's rows, not all 9
    alone, _ = decide_and_force_(StepRules.build([(rules[1], 4)], "cpu"), drafts[3:7], logits[3:7].clone())
    assert torch.equal(mixed[3:7], alone)


def test_reasoning_scope_verifies_rows_at_and_after_a_drafted_end_marker_exactly():
    """top_alpha with alpha 0 accepts every draft; with a reasoning scope (end marker 9),
    a request's rows from its drafted end marker on are left to exact verification, and
    requests without the scope are untouched."""
    from dataclasses import replace

    from selfjudge_vllm.rules import at_or_after_end_marker

    drafts = torch.tensor([1, 9, 2, 3, 4, 9, 9, 5])
    end_ids = torch.tensor([9, 9, 9, 9, -1, 9, 9, 9])
    first_row = torch.tensor([0, 0, 0, 0, 4, 5, 5, 5])
    assert at_or_after_end_marker(drafts, end_ids, first_row).tolist() == [
        False, True, True, True, False, True, True, True]

    scoped = replace(RowRule.top_alpha(0.0), reasoning_end=9)
    step = StepRules.build([(scoped, 4), (RowRule.top_alpha(0.0), 1), (scoped, 3)], "cpu")
    logits = torch.zeros(8, 12)
    logits[:, 0] = 5.0  # the target prefers token 0 everywhere: only relaxed acceptance takes a draft
    accept, _ = decide_and_force_(step, drafts, logits)
    assert accept.tolist() == [True, False, False, False, True, False, False, False]


def test_reasoning_span_follows_the_markers_reading_only_new_tokens():
    from dataclasses import replace

    from selfjudge_vllm.runtime import reasoning_span

    ends_only = replace(RowRule.top_alpha(0.5), reasoning_end=9)
    assert reasoning_span(ends_only, [9, 1], [], None) == (0, True)  # opens with the response
    assert reasoning_span(ends_only, [], [1, 2, 9, 3], (2, True)) == (4, False)
    assert reasoning_span(ends_only, [], [1, 2, 9, 3, 4], (4, False)) == (5, False)
    with_start = replace(ends_only, reasoning_start=7)
    assert reasoning_span(with_start, [1, 7, 2], [], None) == (0, True)  # <think> in the prompt
    assert reasoning_span(with_start, [1, 7, 9, 2], [], None) == (0, False)
    assert reasoning_span(with_start, [1], [3, 7, 4], None) == (3, True)
    # Only the tokens after the ones already read are looked at.
    assert reasoning_span(ends_only, [], [9, 9, 1], (2, True)) == (3, True)


def _naive_entropy_decisions(logits, drafts, counts, min_entropy, window):
    """The entropy rule row by row in float64 (module docstring of rules.py)."""
    out, row = [], 0
    for count in counts:
        for i in range(count):
            p = torch.softmax(logits[row].double(), 0)
            entropy = float(torch.special.entr(p).sum())
            later = range(row + 1, row + 1 + min(window, count - 1 - i))
            agrees = all(int(logits[j].argmax()) == int(drafts[j]) for j in later)
            has_evidence = window == 0 or i < count - 1
            out.append(int(drafts[row]) >= 0 and entropy >= min_entropy and has_evidence and agrees)
            row += 1
    return out


def test_entropy_rule_for_every_window_and_row_count_against_a_naive_reference():
    """Every window the config allows (0-16) and every step size 0..k draft rows, one
    request and two, against a row-by-row reference (windows past the step's rows used to
    crash: issue 30 item 2)."""
    from selfjudge_vllm.rules import ENTROPY

    gen = torch.Generator().manual_seed(11)
    k, vocab = 5, 5
    for window in range(0, 17):
        for rows in range(0, k + 1):
            for counts in ([rows], [rows, max(0, rows - 2)]):
                n = sum(counts)
                logits = torch.randn(n, vocab, generator=gen) * 0.7
                drafts = torch.randint(0, vocab, (n,), generator=gen)
                agree = torch.rand(n, generator=gen) < 0.7
                drafts[agree] = logits[agree].argmax(-1)
                step = StepRules.build([(RowRule(ENTROPY, 1.0), c) for c in counts], "cpu")
                before = logits.clone()
                accept, _ = decide_and_force_(step, drafts, logits, entropy_window=window)
                assert accept.tolist() == _naive_entropy_decisions(before, drafts, counts, 1.0, window), (window, counts)


def test_decisions_on_verifying_rows_inside_a_larger_logits_tensor_equal_the_gathered_rows():
    """Model runner V2 verifies drafts and bonus rows in one tensor: deciding through
    `logit_rows` takes the same decisions and forces the same entries as deciding on the
    gathered draft rows, and leaves every other row untouched."""
    from selfjudge_vllm.rules import ENTROPY, TOP_ALPHA

    gen = torch.Generator().manual_seed(5)
    vocab, counts = 7, [3, 4, 0, 2]
    rules = [RowRule.top_alpha(0.2), RowRule(ENTROPY, 0.9), RowRule(JUDGE, 0.1), RowRule(JUDGE, -0.2)]
    n = sum(counts)
    # V2 layout: each request's draft rows, then its bonus row.
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c + 1)
    verify_rows = torch.tensor([r for i, c in enumerate(counts) for r in range(bounds[i], bounds[i] + c)])
    full = torch.randn(bounds[-1], vocab, generator=gen)
    drafts = torch.randint(0, vocab, (n,), generator=gen)
    agree = torch.rand(n, generator=gen) < 0.5
    drafts[agree] = full.index_select(0, verify_rows)[agree].argmax(-1)
    drafts[1] = -1
    hidden, head = torch.randn(n, 3, generator=gen), JudgeHead(torch.randn(3, generator=gen), torch.zeros(1))
    for mixed in (rules, [rules[1]] * 4, [rules[0]] * 4):
        step = StepRules.build(zip(mixed, counts), "cpu")
        gathered = full.index_select(0, verify_rows)
        expected, _ = decide_and_force_(step, drafts, gathered, hidden, head)
        inside = full.clone()
        got, _ = decide_and_force_(step, drafts, inside, hidden, head, logit_rows=verify_rows)
        assert got.tolist() == expected.tolist()
        assert torch.equal(inside.index_select(0, verify_rows), gathered)
        others = torch.ones(bounds[-1], dtype=torch.bool)
        others[verify_rows] = False
        assert torch.equal(inside[others], full[others])
    assert {TOP_ALPHA, ENTROPY, JUDGE} <= StepRules.build(zip(rules, counts), "cpu").present


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_forced_draft_is_finite_in_the_logits_dtype_and_takes_all_the_mass(dtype):
    """Issue 43: model runner V2 may hand the model's own float16 tensor to verification; 1e30
    is +inf there, and softmax (the kernels upcast to float32 and compute exp(x - max)) turns
    an inf entry into NaN. The forced entry must stay finite and still take all the mass."""
    logits = (torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    logits[2, 5] = float("-inf")  # banned: never forced
    drafts = torch.tensor([4, 7, 5])
    rules = StepRules(RowRule.top_alpha(0.0), present=frozenset({RowRule.top_alpha(0.0).rule}))
    accept, _ = decide_and_force_(rules, drafts, logits)
    assert accept.tolist() == [True, True, False]
    forced = logits[[0, 1], [4, 7]]
    assert torch.isfinite(forced).all(), forced
    probs = torch.softmax(logits[:2].float(), -1)
    assert not probs.isnan().any() and probs[[0, 1], [4, 7]].tolist() == [1.0, 1.0]
    assert logits[:2].float().argmax(-1).tolist() == [4, 7]
