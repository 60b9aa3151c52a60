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


class LiveTensorBytes:
    """Peak bytes of tensor storages allocated inside the block and alive at the same time
    (torch's dispatch sees every allocation; a storage's Python object lives exactly as long
    as the storage, so its finalizer marks the free)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.utils._pytree import tree_leaves

                known = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._new(t.untyped_storage(), known)
                return out

        self.mode, self.live, self.peak, self._tracked = Mode(), 0, 0, set()

    def _new(self, storage, known):
        import weakref

        key = id(storage)
        if key in known or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, nbytes):
        self._tracked.discard(key)
        self.live -= nbytes

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_memory_profiling_covers_the_worst_step_the_server_can_reach():
    """The judge's temporaries in a worst-case step (max_num_seqs x k draft rows, every rule
    with vocabulary-wide work, mixed per request, a logit-feature head) never exceed what the
    profiling pass allocates; profiling only vLLM's dummy rows (one per request) would
    undercount them."""
    from selfjudge_vllm.features import LOGIT_FEATURES
    from selfjudge_vllm.rules import ENTROPY, JUDGE, JudgeHead

    max_num_seqs, k, vocab, hidden_size = 64, 8, 4096, 32
    rows = max_num_seqs * k  # 512 draft rows; a chunk holds 256 rows of 4096
    gen = torch.Generator().manual_seed(0)
    head = JudgeHead(torch.randn(hidden_size, generator=gen), torch.zeros(1),
                     torch.randn(len(LOGIT_FEATURES), generator=gen), LOGIT_FEATURES)
    rules = [RowRule(JUDGE, 0.0), RowRule(ENTROPY, 0.5), RowRule.named("top_alpha", 0.3), RowRule.named("fly", 0.3)]
    counts = [k] * max_num_seqs
    step_rules = StepRules.build([(rules[i % len(rules)], c) for i, c in enumerate(counts)], "cpu")
    assert step_rules.present == {rule.rule for rule in rules}

    def profile_peak(max_step_rows):
        runtime = JudgeRuntime(head, None, 0.0, rules[0], max_step_rows=max_step_rows)
        dummy = torch.randn(max_num_seqs, vocab, generator=gen)  # vLLM's dummy rows
        with LiveTensorBytes() as tracked:
            runtime.profile_(dummy)
        return tracked.peak

    def step_peak(layout):
        runtime = JudgeRuntime(head, None, 0.0, rules[0], max_step_rows=rows)
        drafts = torch.randint(0, vocab, (rows,), generator=gen)
        if layout == "v1":  # draft rows alone; sampled rows = draft rows + bonus rows
            processed = torch.randn(rows, vocab, generator=gen)
            verify_rows = torch.arange(rows) + torch.arange(rows) // k  # skip each bonus row
            logit_rows = None
        else:  # model runner V2: drafts and bonus rows in one tensor
            processed = torch.randn(rows + max_num_seqs, vocab, generator=gen)
            verify_rows = logit_rows = torch.arange(rows) + torch.arange(rows) // k
        raw = torch.randn(rows + max_num_seqs, vocab, generator=gen)
        hidden = torch.randn(rows + max_num_seqs, hidden_size, generator=gen)
        with LiveTensorBytes() as tracked:
            runtime.decide_(step_rules, drafts, processed, verify_rows, lambda r: hidden.index_select(0, r), raw,
                            logit_rows)
            runtime.unforce_()
        return tracked.peak

    worst_profile, dummy_only = profile_peak(rows), profile_peak(0)
    for layout in ("v1", "v2"):
        peak = step_peak(layout)
        print(f"{layout}: step peak {peak / 2**20:.1f} MiB, profiled {worst_profile / 2**20:.1f} MiB "
              f"(dummy rows only: {dummy_only / 2**20:.1f} MiB)")
        assert peak <= worst_profile, (layout, peak, worst_profile)
        assert dummy_only < peak


def test_model_runner_v2_profiling_holds_the_judges_temporaries_beside_vllms_own_pass():
    """Issue 43: model runner V2 profiles vLLM's sampler on dummy rows outside verification.
    The judge's work must be allocated while that pass runs, so the peak that sizes the KV
    cache is the sum of both (the judge run after it gave only the larger of the two), and it
    reads the logits as `sample` computes them (ModelState.compute_sample_logits)."""
    from selfjudge_vllm import adapter_v2

    max_num_seqs, k, vocab, hidden_size = 16, 4, 4096, 32
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.randn(hidden_size, vocab, generator=gen)
    dummy_hidden = torch.randn(max_num_seqs, hidden_size, generator=gen)

    def runner(runtime):
        state = SimpleNamespace(compute_sample_logits=lambda h: (h @ lm_head).to(torch.bfloat16))
        return SimpleNamespace(_selfjudge_runtime=runtime, model_state=state)

    def vllm_dummy_pass(self, hidden_states):  # what vLLM's pass holds: logits and a float32 copy
        logits = self.model_state.compute_sample_logits(hidden_states)
        processed = torch.empty_like(logits, dtype=torch.float32).copy_(logits)
        return processed.argmax(-1)

    def peak(fn):
        with LiveTensorBytes() as tracked:
            fn()
        return tracked.peak

    runtime = JudgeRuntime(None, None, 0.0, RowRule.named("entropy", 1.0), max_step_rows=max_num_seqs * k)
    vllm_alone = peak(lambda: vllm_dummy_pass(runner(None), dummy_hidden))
    judge_alone = peak(lambda: runtime.profile_((dummy_hidden @ lm_head).to(torch.bfloat16)))
    wrapped = adapter_v2._wrap_dummy_sampler_run(vllm_dummy_pass)
    both = peak(lambda: wrapped(runner(runtime), dummy_hidden))
    print(f"vLLM's pass {vllm_alone / 2**20:.2f} MiB, the judge's {judge_alone / 2**20:.2f} MiB, "
          f"profiled together {both / 2**20:.2f} MiB")
    assert runtime.profiled_rows == 2 * max_num_seqs * k  # judge_alone, then the wrapped pass
    assert both >= vllm_alone + judge_alone, (both, vllm_alone, judge_alone)
    assert peak(lambda: wrapped(runner(None), dummy_hidden)) == vllm_alone  # plugin off: vLLM's pass alone


def test_every_rule_knob_has_a_server_floor_refused_per_request():
    """min_threshold used to bound the judge only: a request could set selfjudge_alpha=0 or
    selfjudge_min_entropy=0 and accept every draft."""
    from selfjudge_vllm.request_control import RulePolicy
    from selfjudge_vllm.rules import RULES

    assert all(spec.floor for spec in RULES.values())
    policy = RulePolicy(parse_section({"selfjudge": {
        "rule": "top_alpha", "request_rules": ["entropy"], "alpha": 0.5, "min_alpha": 0.2,
        "min_entropy": 2.0, "min_entropy_floor": 1.0}}))
    assert policy.for_request({"selfjudge_alpha": 0.2}).knob == math.log(0.2)
    with pytest.raises(ValueError, match=r"selfjudge_alpha 0 is looser than this server allows \(min_alpha 0.2\)"):
        policy.for_request({"selfjudge_alpha": 0.0})
    assert policy.for_request({"selfjudge_rule": "entropy", "selfjudge_min_entropy": 1.5}).knob == 1.5
    with pytest.raises(ValueError, match=r"min_entropy_floor 1"):
        policy.for_request({"selfjudge_rule": "entropy", "selfjudge_min_entropy": 0.0})
    with pytest.raises(ConfigError, match="below the server's own floor 'min_alpha'"):
        parse_section({"selfjudge": {"rule": "top_alpha", "alpha": 0.1, "min_alpha": 0.2}})


def test_a_request_id_reused_on_model_runner_v1_starts_fresh():
    """vLLM V1 prunes a request's state only when a step goes by without it; a new request
    that reuses a finished one's id in the very next step must not inherit its closed span."""
    from selfjudge_vllm import adapter_v1

    scoped = RowRule(SCOPED.rule, SCOPED.knob, END, None)
    runtime = JudgeRuntime(None, None, 0.0, scoped)
    metadata = SimpleNamespace(num_draft_tokens=[2])

    def request(output):
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), prompt_token_ids=[1],
                               output_token_ids=output)

    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a"]), requests={"a": request([4, END, 5])})
    runtime.step_rules(adapter_v1._step_requests(runner, runtime, metadata), "cpu")
    assert runtime._spans["a"][1] is False  # its reasoning ended
    runtime.step_rules(adapter_v1._step_requests(runner, runtime, metadata), "cpu")
    assert runtime._spans["a"][1] is False  # same request, next step: still ended
    runner.requests["a"] = request([6])  # a new request under the same id
    runtime.step_rules(adapter_v1._step_requests(runner, runtime, metadata), "cpu")
    assert runtime._spans["a"] == (1, True)


@pytest.mark.engine
def test_processed_logprobs_of_relaxed_tokens_are_the_targets_own(tiny_pair):
    """vLLM 0.32 (V1) computes processed logprobs from the logits the judge forced: accepted
    drafts used to report logprob 0.0. Each generated token's reported logprob must equal the
    target's own, as re-scoring the text through prompt logprobs gives it (greedy: processed
    and raw logprobs agree)."""
    import gc

    from vllm import LLM, SamplingParams

    from tests.engine_helpers import PROMPTS, spec_config

    target, draft = tiny_pair
    llm = LLM(model=str(target), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              speculative_config=spec_config("draft_model", draft), logprobs_mode="processed_logprobs",
              additional_config={"selfjudge": {"rule": "top_alpha", "alpha": 0.0}}, max_num_seqs=8)
    try:
        outputs = llm.generate(PROMPTS[:4], SamplingParams(max_tokens=24, temperature=0.0, logprobs=0),
                               use_tqdm=False)
        forced = llm.collective_rpc(lambda worker: worker.model_runner._selfjudge_runtime.flush().judge_accepted)[0]
        compared = mismatched = 0
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            rescored = llm.generate([{"prompt_token_ids": list(out.prompt_token_ids) + tokens}],
                                    SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
            reference = rescored.prompt_logprobs[len(out.prompt_token_ids):]
            for token, reported, expected in zip(tokens, out.outputs[0].logprobs, reference):
                compared += 1
                mismatched += abs(reported[token].logprob - expected[token].logprob) > 1e-3
    finally:
        del llm
        gc.collect()
    assert forced > 10 and compared >= 4 * 24 - 4
    assert mismatched == 0, f"{mismatched} of {compared} reported logprobs differ from the target's own"
