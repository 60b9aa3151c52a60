"""The model runner V2 adapter against vLLM 0.34.0's own verification code.

Run in the environment `scripts/setup_env.sh` builds beside the main one (.venv-mrv2: the
upstream vLLM 0.34.0 wheel, its Python dependencies, torch 2.14.1 and Triton), with
`TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=`: vLLM's Triton kernels then run in Triton's
interpreter on CPU tensors. vLLM 0.34 itself cannot start an engine there (its x86 CPU
runner needs a CPU build of vLLM and the triton-cpu wheel; see docs in the README), so this
drives the real `RejectionSampler.__call__` -> `_verify_in_chunks` -> `_verify` ->
`rejection_sample` kernels and `gather_draft_sampled` / `get_num_sampled_and_rejected`,
with the adapter's wraps installed exactly as in a worker, under a stand-in for the part of
`GPUModelRunner.sample` above them (logits = hidden states of the sampled rows x a random
LM head). Not covered: the runner's own batch preparation, sampling parameters beyond
temperature (a stand-in sampler applies temperature only), and anything on a GPU.

Prints one line per check and "N passed, 0 failed"; exits non-zero on a failure. Called by
tests/test_adapter_v2.py.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import torch
import vllm
import vllm.v1.worker.gpu.spec_decode.rejection_sampler as vllm_verify

from selfjudge_vllm import adapter_v2
from selfjudge_vllm.patching import _install
from selfjudge_vllm.rules import JudgeHead, RowRule
from selfjudge_vllm.runtime import JudgeRuntime

VOCAB, HIDDEN, MAX_REQS = 96, 16, 8


class StandInSampler:
    """What RejectionSampler reads of vLLM's Sampler, with temperature as the only sampling
    parameter (processed logits = logits / temperature for sampled rows, as vLLM does)."""

    def __init__(self, temperature: list[float], prefill_len: list[int]):
        temps = torch.zeros(MAX_REQS)
        temps[: len(temperature)] = torch.tensor(temperature)
        self.sampling_states = SimpleNamespace(temperature=SimpleNamespace(gpu=temps),
                                               seeds=SimpleNamespace(gpu=torch.arange(MAX_REQS) + 1234))
        prefill = torch.zeros(MAX_REQS, dtype=torch.int32)
        prefill[: len(prefill_len)] = torch.tensor(prefill_len, dtype=torch.int32)
        self.req_states = SimpleNamespace(prefill_len=SimpleNamespace(gpu=prefill))
        self.compute_nans, self.logprobs_mode, self.return_sampling_mask = False, "raw_logprobs", False
        self.use_fp64_gumbel, self.trace_replay_state = False, None
        self.may_mask_logits = np.zeros(MAX_REQS, dtype=bool)
        self.logprob_token_ids_state = None

    def get_logprobs_dims(self, idx_mapping_np):
        return None

    def apply_sampling_params(self, logits, expanded_idx_mapping, *args):
        temps = self.sampling_states.temperature.gpu.index_select(0, expanded_idx_mapping.long())
        return logits.float() / torch.where(temps > 0, temps, 1.0).unsqueeze(1)


def make_batch(drafts_per_request: list[list[int]], last_sampled: list[int], prefill_len: list[int]):
    """An InputBatch of decode requests, each verifying its drafts (vLLM's field names)."""
    num_reqs = len(drafts_per_request)
    num_logits = [len(d) + 1 for d in drafts_per_request]
    cu = np.concatenate([[0], np.cumsum(num_logits)]).astype(np.int32)
    input_ids = torch.tensor([t for last, d in zip(last_sampled, drafts_per_request) for t in [last, *d]],
                             dtype=torch.int32)
    seq_lens = [p + 10 + n for p, n in zip(prefill_len, num_logits)]
    positions = torch.tensor([s - n + j for s, n in zip(seq_lens, num_logits) for j in range(n)], dtype=torch.int64)
    idx_mapping = torch.arange(num_reqs, dtype=torch.int32)
    return SimpleNamespace(
        req_ids=[f"req-{i}" for i in range(num_reqs)], num_reqs=num_reqs,
        num_draft_tokens=sum(len(d) for d in drafts_per_request),
        input_ids=input_ids, positions=positions,
        logits_indices=torch.arange(int(cu[-1]), dtype=torch.int64),  # one token row per logits row
        cu_num_logits=torch.from_numpy(cu.copy()), cu_num_logits_np=cu,
        idx_mapping=idx_mapping, idx_mapping_np=idx_mapping.numpy(),
        expanded_idx_mapping=torch.repeat_interleave(idx_mapping, torch.tensor(num_logits)),
        expanded_local_pos=torch.cat([torch.arange(n, dtype=torch.int32) for n in num_logits]),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
    )


class StandInRunner:
    """The part of GPUModelRunner.sample above the rejection sampler: logits of the sampled
    rows, then verification (vLLM 0.34.0 model_runner.py, `sample`)."""

    def __init__(self, runtime, rejection_sampler, lm_head):
        self._selfjudge_runtime, self.rejection_sampler, self.lm_head = runtime, rejection_sampler, lm_head
        self._selfjudge_options = {}
        self.model_state = SimpleNamespace(num_new_sampled_tokens_per_step=1)
        self.batch_sharder = None

    def sample(self, hidden_states, input_batch, grammar_output):
        logits = hidden_states[input_batch.logits_indices] @ self.lm_head
        output = self.rejection_sampler(logits, input_batch, None)
        return output, output.num_sampled, output.num_rejected


def verify(runtime, batch, hidden, lm_head, temperature, prefill_len, options=None, **spec_settings):
    """Verify `batch` through vLLM's RejectionSampler with the adapter's sample wrap (the
    judge off when `runtime` is None); `spec_settings` override the speculative config."""
    sampler = StandInSampler(temperature, prefill_len)
    spec = SimpleNamespace(num_speculative_tokens=max(len(r) - 1 for r in np.split(
        np.arange(int(batch.cu_num_logits_np[-1])), batch.cu_num_logits_np[1:-1])),
        enable_adaptive_verification=False, rejection_sample_method="standard",
        fly_entropy_threshold=0.3, fly_entropy_top_k=3, synthetic_acceptance_rates=None, fly_window_size=None)
    for name, value in spec_settings.items():
        setattr(spec, name, value)
    runner = StandInRunner(runtime, vllm_verify.RejectionSampler(sampler, spec, torch.device("cpu")), lm_head)
    runner._selfjudge_options.update(options or {})
    output, num_sampled, _ = adapter_v2._wrap_sample(StandInRunner.sample)(runner, hidden, batch, None)
    tokens = output.sampled_token_ids
    return [tokens[i, : int(num_sampled[i])].tolist() for i in range(batch.num_reqs)]


def reference_greedy(batch, hidden, lm_head, accept_row):
    """Greedy verification by hand: a draft is kept while the target's argmax equals it or
    `accept_row(global row, draft)` says the judge accepts it; then the target's token."""
    logits = hidden[batch.logits_indices] @ lm_head
    out = []
    cu = batch.cu_num_logits_np
    for i in range(batch.num_reqs):
        tokens = []
        for row in range(int(cu[i]), int(cu[i + 1])):
            top = int(logits[row].argmax())
            if row == cu[i + 1] - 1:
                tokens.append(top)  # bonus
                break
            draft = int(batch.input_ids[row + 1])
            if draft >= 0 and (draft == top or accept_row(row, draft)):
                tokens.append(draft)
                continue
            tokens.append(top)
            break
        out.append(tokens)
    return out


CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def fixture(seed=0, drafts=((5, 7, 9, 11), (3, 3, 8), (2,), (40, 41, 42, 43)), agree_first=True):
    torch.manual_seed(seed)
    hidden = torch.randn(sum(len(d) + 1 for d in drafts), HIDDEN)
    lm_head = torch.randn(HIDDEN, VOCAB)
    drafts = [list(d) for d in drafts]
    if agree_first:  # the first draft of each request agrees with the target, so steps go on
        logits = hidden @ lm_head
        start = 0
        for d in drafts:
            d[0] = int(logits[start].argmax())
            start += len(d) + 1
    prefill = [20] * len(drafts)
    return make_batch(drafts, [1] * len(drafts), prefill), hidden, lm_head, prefill


def runtime_with(rule: RowRule, head=None, request_rule=None, **settings):
    return JudgeRuntime(head, None, 0.0, rule, request_rule, **settings)


@check
def judge_off_is_token_identical_to_stock_verification():
    batch, hidden, lm_head, prefill = fixture()
    stock = StandInRunner(None, None, lm_head)
    sampler = StandInSampler([0.0] * batch.num_reqs, prefill)
    spec = SimpleNamespace(num_speculative_tokens=4, enable_adaptive_verification=False,
                           rejection_sample_method="standard", fly_entropy_threshold=0.3, fly_entropy_top_k=3,
                           synthetic_acceptance_rates=None, fly_window_size=None)
    stock.rejection_sampler = vllm_verify.RejectionSampler(sampler, spec, torch.device("cpu"))
    expected = stock.sample(hidden, batch, None)
    expected = [expected[0].sampled_token_ids[i, : int(expected[1][i])].tolist() for i in range(batch.num_reqs)]
    lossless = verify(runtime_with(RowRule(0, math.inf)), batch, hidden, lm_head, [0.0] * 4, prefill)
    assert lossless == expected, (lossless, expected)
    assert expected == reference_greedy(batch, hidden, lm_head, lambda row, draft: False), expected


@check
def accept_all_accepts_every_draft_greedy_and_sampled():
    batch, hidden, lm_head, prefill = fixture(seed=1, agree_first=False)
    accept_all = RowRule.named("top_alpha", 0.0)
    for temperature in (0.0, 0.8):
        got = verify(runtime_with(accept_all), batch, hidden, lm_head, [temperature] * 4, prefill)
        for i, tokens in enumerate(got):
            drafts = batch.input_ids[int(batch.cu_num_logits_np[i]) + 1 : int(batch.cu_num_logits_np[i + 1])].tolist()
            assert tokens[:-1] == drafts and len(tokens) == len(drafts) + 1, (temperature, tokens, drafts)


@check
def a_half_threshold_head_matches_an_independent_reference():
    batch, hidden, lm_head, prefill = fixture(seed=2)
    head = JudgeHead(torch.randn(HIDDEN), torch.tensor(0.0))
    scores = hidden @ head.weight  # the hidden state at the draft's own position: row + 1
    threshold = float(scores.median())
    runtime = runtime_with(RowRule(1, threshold), head)
    got = verify(runtime, batch, hidden, lm_head, [0.0] * 4, prefill)
    want = reference_greedy(batch, hidden, lm_head, lambda row, draft: float(scores[row + 1]) >= threshold)
    assert got == want, (got, want)
    stock = reference_greedy(batch, hidden, lm_head, lambda row, draft: False)
    assert got != stock, "the head should change some outputs on this fixture"


@check
def per_request_lossless_rows_are_untouched_in_a_mixed_step():
    batch, hidden, lm_head, prefill = fixture(seed=3, agree_first=False)
    from selfjudge_vllm.request_control import request_options

    def request_rule(extra_args):
        options = request_options(extra_args)
        return RowRule(0, math.inf) if options is not None and not options.enabled else RowRule.named("top_alpha", 0.0)

    options = {"req-1": {"selfjudge_enabled": False}, "req-3": {"selfjudge_enabled": False}}
    got = verify(runtime_with(RowRule.named("top_alpha", 0.0), request_rule=request_rule), batch, hidden, lm_head,
                 [0.0] * 4, prefill, options)
    stock = reference_greedy(batch, hidden, lm_head, lambda row, draft: False)
    everything = reference_greedy(batch, hidden, lm_head, lambda row, draft: True)
    assert got[1] == stock[1] and got[3] == stock[3], (got, stock)
    assert got[0] == everything[0] and got[2] == everything[2], (got, everything)


@check
def chunked_verification_decides_the_same_rows():
    batch, hidden, lm_head, prefill = fixture(seed=4)
    head = JudgeHead(torch.randn(HIDDEN), torch.tensor(0.0))
    threshold = float((hidden @ head.weight).median())
    whole = verify(runtime_with(RowRule(1, threshold), head), batch, hidden, lm_head, [0.0] * 4, prefill)
    saved = vllm_verify.MAX_CHUNK_BYTES
    vllm_verify.MAX_CHUNK_BYTES = VOCAB * 4 * 6  # at most 6 logits rows per chunk: 3 chunks here
    try:
        chunked = verify(runtime_with(RowRule(1, threshold), head), batch, hidden, lm_head, [0.0] * 4, prefill)
    finally:
        vllm_verify.MAX_CHUNK_BYTES = saved
    assert chunked == whole, (chunked, whole)


@check
def placeholder_drafts_are_never_accepted():
    batch, hidden, lm_head, prefill = fixture(seed=5, agree_first=False)
    batch.input_ids[2] = -1  # request 0's second draft is a placeholder (async scheduling)
    got = verify(runtime_with(RowRule.named("top_alpha", 0.0)), batch, hidden, lm_head, [0.0] * 4, prefill)
    assert len(got[0]) == 2, got[0]  # first draft accepted, then the target's own token


def fly_fixture(seed, drafts_per_request=(6, 6, 3, 1, 6, 5)):
    """Rows where the target hesitates between up to three tokens (FLy's top-3 entropy from
    about 0 to ln 3) and drafts that take its top choice, another of its three, or noise."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(n + 1 for n in drafts_per_request)
    hidden = torch.randn(rows, HIDDEN, generator=gen)
    lm_head = torch.randn(HIDDEN, VOCAB, generator=gen) * 0.3
    logits = hidden @ lm_head
    candidates = torch.stack([torch.randperm(VOCAB, generator=gen)[:3] for _ in range(rows)])
    gaps = torch.rand(rows, 2, generator=gen) * 3.0
    boost = torch.stack([torch.full((rows,), 8.0), 8.0 - gaps[:, 0], 8.0 - gaps[:, 0] - gaps[:, 1]], 1)
    # Hidden states are free here: shift each row's logits through an extra hidden direction.
    target = logits.scatter(1, candidates, boost)
    lm_head_rows = torch.linalg.lstsq(hidden, target).solution  # hidden @ lm_head_rows ~= target
    drafts, start = [], 0
    for n in drafts_per_request:
        request = []
        for j in range(n):
            top = (hidden[start + j] @ lm_head_rows).topk(3).indices
            u = float(torch.rand((), generator=gen))
            request.append(int(top[0]) if u < 0.6 else int(top[1 + (u < 0.85)]) if u < 0.95
                           else int(torch.randint(0, VOCAB, (), generator=gen)))
        drafts.append(request)
        start += n + 1
    prefill = [20] * len(drafts_per_request)
    return make_batch(drafts, [1] * len(drafts), prefill), hidden, lm_head_rows, prefill


@check
def the_fly_rule_takes_vllms_own_fly_decisions_greedy():
    """vLLM 0.34.0's FLy (rejection_sample_method="fly", the kernels' deferred window) and the
    plugin's `fly` rule on standard verification emit the same tokens, greedy, over windows,
    thresholds and top-k."""
    compared = differing_from_stock = 0
    for seed in range(12):
        batch, hidden, lm_head, prefill = fly_fixture(seed)
        for window, threshold, top_k in ((5, 0.3, 3), (2, 0.3, 3), (1, 0.6, 2), (3, 0.1, 5)):
            vllms = verify(None, batch, hidden, lm_head, [0.0] * 6, prefill, rejection_sample_method="fly",
                           fly_window_size=window, fly_entropy_threshold=threshold, fly_entropy_top_k=top_k)
            ours = verify(runtime_with(RowRule.named("fly", threshold), fly_window=window, fly_top_k=top_k),
                          batch, hidden, lm_head, [0.0] * 6, prefill)
            assert ours == vllms, (seed, window, threshold, top_k, ours, vllms)
            stock = verify(None, batch, hidden, lm_head, [0.0] * 6, prefill)
            compared += 1
            differing_from_stock += ours != stock
    assert differing_from_stock >= compared // 3, (differing_from_stock, compared)  # FLy did relax here


@check
def a_step_verified_elsewhere_fails_loudly():
    batch, hidden, lm_head, prefill = fixture(seed=6)
    runner = StandInRunner(runtime_with(RowRule.named("top_alpha", 0.0)), None, lm_head)

    def sample_without_verification(self, hidden_states, input_batch, grammar_output):
        return None, None, None

    runner.rejection_sampler = object()
    try:
        adapter_v2._wrap_sample(sample_without_verification)(runner, hidden, batch, None)
    except Exception as exc:  # JudgeNotAppliedError
        assert "routes verification elsewhere" in str(exc), exc
    else:
        raise AssertionError("a step whose drafts were not judged must fail")


def main() -> int:
    assert vllm.__version__.startswith("0.34"), vllm.__version__
    _install(f"{adapter_v2.VERIFY}:RejectionSampler.__call__", adapter_v2._wrap_verify_call)
    _install(f"{adapter_v2.VERIFY}:rejection_sample", adapter_v2._wrap_rejection_sample)
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn()
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAILED {fn.__name__}: {type(exc).__name__}: {exc}")
        else:
            passed += 1
            print(f"ok {fn.__name__}")
    print(f"vLLM {vllm.__version__}: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
