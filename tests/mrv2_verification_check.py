"""The model runner V2 adapter against vLLM 0.34.0's own sampling and verification code.

Run in the environment `scripts/setup_env.sh` builds beside the main one (.venv-mrv2: the
upstream vLLM 0.34.0 wheel, its Python dependencies, torch 2.14.1 and Triton), with
`TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=`: vLLM's Triton kernels then run in Triton's
interpreter on CPU tensors. vLLM 0.34 itself cannot start an engine there (its x86 CPU
runner needs a CPU build of vLLM and the triton-cpu wheel; see docs/vllm-integration.md).

What is vLLM's own here, built as `GPUModelRunner.__init__` builds it: `RequestState`,
`Sampler` (its `apply_sampling_params`, which returns the model's own logits tensor when no
request of a chunk needs processing and a float32 copy otherwise; logit bias, penalties, bad
words, temperature, min-p, top-k/top-p; the logprobs modes), `RejectionSampler` (chunking,
`gather_draft_sampled`, the rejection kernels, logprobs of the verified rows),
`DraftLogitsCache` (draft_sample_method="probabilistic") and the grammar bitmask kernel.
What is replicated: the few lines of `GPUModelRunner.sample` above them (logits of the
sampled rows, the bitmask, the rejection sampler call; `runner_sample_matches_vllm` checks
that vLLM's source still reads so), the copy-stream juggling of
`StructuredOutputsWorker.apply_grammar_bitmask` (CUDA only), and vLLM's UVA buffers (on
CPU the device view of a host buffer is the host tensor itself, as on vLLM's CPU platform).
`GPUModelRunner` itself is not imported: its module needs `llguidance`, which the lock
leaves out.

Prints one line per check and "N passed, 0 failed"; exits non-zero on a failure. Called by
tests/test_adapter_v2.py. `--cells N` sizes the matrix (default: the all-pairs cover).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import math
import random
import sys
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import vllm
import vllm.v1.worker.gpu.buffer_utils as vllm_buffers


class HostBuffer:
    """vLLM's UvaBuffer on a CPU: the host tensor is its own device view (vLLM's CPU
    platform does the same); the upstream class pins memory through CUDA."""

    def __init__(self, size, dtype):
        self.cpu = torch.zeros(size, dtype=dtype)
        self.np = self.cpu.numpy()

    def uva(self, n=None):
        return self.cpu if n is None else self.cpu[:n]


vllm_buffers.UvaBuffer = HostBuffer

import vllm.utils.torch_utils as vllm_torch_utils  # noqa: E402
import vllm.v1.sample.ops.topk_topp_sampler as vllm_topk_topp  # noqa: E402

# What a CPU process cannot run (vLLM resolves no platform here): host staging is not
# pinned (pinning needs CUDA), and top-k/top-p take vLLM's PyTorch implementation (its
# path without Triton): its Triton top-k/top-p kernel does not run in Triton's interpreter.
vllm_torch_utils.PIN_MEMORY = False
vllm_topk_topp.HAS_TRITON = False

import vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils as vllm_kernels  # noqa: E402
from vllm.triton_utils import tl  # noqa: E402

# Triton's interpreter has no libdevice: the residual of a rejected draft under
# draft_sample_method="probabilistic" (the one libdevice call, _resample_kernel) takes
# log(1 + x) for log1p(x). Stock and judged runs share it, and forced rows never resample.
vllm_kernels.tldevice = SimpleNamespace(log1p=lambda x: tl.log(1.0 + x))

import vllm.v1.worker.gpu.spec_decode.rejection_sampler as vllm_verify  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu.sample.sampler import Sampler  # noqa: E402
from vllm.v1.worker.gpu.spec_decode.draft_logits import DraftLogitsCache  # noqa: E402
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402
from vllm.v1.worker.gpu.structured_outputs import (  # noqa: E402
    GRAMMAR_BITMASK_BLOCK_SIZE,
    _apply_grammar_bitmask_kernel,
)

from selfjudge_vllm import adapter_v2  # noqa: E402
from selfjudge_vllm.features import LOGIT_FEATURES  # noqa: E402
from selfjudge_vllm.patching import _install  # noqa: E402
from selfjudge_vllm.rules import JUDGE, JudgeHead, RowRule  # noqa: E402
from selfjudge_vllm.runtime import JudgeRuntime  # noqa: E402

VOCAB, HIDDEN, MAX_REQS, MAX_MODEL_LEN = 96, 16, 8, 128
CPU = torch.device("cpu")
ACCEPT_ALL = RowRule.named("top_alpha", 0.0)
LOSSLESS = RowRule(0, math.inf)


# -- vLLM's sampling stack, as GPUModelRunner builds it -------------------------------------

@dataclass
class Request:
    drafts: list[int]
    params: SamplingParams
    prompt: list[int] = field(default_factory=lambda: [3, 4, 5, 6])
    output: list[int] = field(default_factory=list)  # generated before this step
    last: int = 1  # the input token of the request's first row (sampled last step)
    options: dict | None = None  # SamplingParams.extra_args (selfjudge_*)


class Stack:
    """RequestState, Sampler and RejectionSampler of one model runner (vLLM 0.34.0
    model_runner.py, GPUModelRunner.__init__), with the requests of one step added as
    `add_requests` adds them."""

    def __init__(self, requests: list[Request], logprobs_mode="raw_logprobs", draft_logits=None,
                 **spec_settings):
        num_spec = max(len(r.drafts) for r in requests)
        self.req_states = RequestState(MAX_REQS, MAX_MODEL_LEN, 512, num_spec, VOCAB, CPU)
        self.sampler = Sampler(SimpleNamespace(reasoning_config=None), MAX_REQS, VOCAB, CPU, self.req_states,
                               logprobs_mode=logprobs_mode, num_speculative_tokens=num_spec + 1)
        spec = SimpleNamespace(num_speculative_tokens=num_spec, enable_adaptive_verification=False,
                               rejection_sample_method="standard", fly_entropy_threshold=0.3, fly_entropy_top_k=3,
                               synthetic_acceptance_rates=None, fly_window_size=None)
        for name, value in spec_settings.items():
            setattr(spec, name, value)
        self.rejection_sampler = vllm_verify.RejectionSampler(self.sampler, spec, CPU)
        self.mask_stride = num_spec + 1
        self.requests = requests
        for i, request in enumerate(requests):
            tokens = request.prompt + request.output
            self.req_states.add_request(f"req-{i}", len(request.prompt), tokens, len(tokens), 64)
            self.sampler.add_request(self.req_states.req_id_to_index[f"req-{i}"], request.params)
        self.req_states.apply_staged_writes()
        self.sampler.apply_staged_writes()
        self.batch = self._batch()
        self.draft_logits = None
        if draft_logits is not None:  # [requests, num_spec, V]: what the drafter cached
            self.draft_logits = DraftLogitsCache(MAX_REQS, num_spec, VOCAB, dtype=draft_logits.dtype, fill=0.0,
                                                 device=CPU)
            for i in range(len(requests)):
                self.draft_logits.values[self.batch.idx_mapping_np[i]] = draft_logits[i]
            # An identity row mapping reads the same rows as a replicated cache; Triton's
            # interpreter cannot take the replicated cache's None pointer (_resample_kernel).
            self.draft_logits.row_mapping = torch.arange(MAX_REQS, dtype=torch.int32)

    def _batch(self):
        """The step's InputBatch (vLLM's field names): request i's rows sit at positions
        prefill_len .. prefill_len + drafts, its input tokens are [last, *drafts]."""
        requests = self.requests
        num_logits = [len(r.drafts) + 1 for r in requests]
        cu = np.concatenate([[0], np.cumsum(num_logits)]).astype(np.int32)
        prefill = [len(r.prompt) + len(r.output) for r in requests]
        idx_mapping = torch.tensor([self.req_states.req_id_to_index[f"req-{i}"] for i in range(len(requests))],
                                   dtype=torch.int32)
        seq_lens = torch.tensor([p + n for p, n in zip(prefill, num_logits)], dtype=torch.int32)
        return SimpleNamespace(
            req_ids=[f"req-{i}" for i in range(len(requests))], num_reqs=len(requests),
            num_draft_tokens=sum(len(r.drafts) for r in requests),
            input_ids=torch.tensor([t for r in requests for t in [r.last, *r.drafts]], dtype=torch.int32),
            positions=torch.tensor([p + j for p, n in zip(prefill, num_logits) for j in range(n)], dtype=torch.int64),
            logits_indices=torch.arange(int(cu[-1]), dtype=torch.int64),  # one token row per logits row
            cu_num_logits=torch.from_numpy(cu.copy()), cu_num_logits_np=cu,
            idx_mapping=idx_mapping, idx_mapping_np=idx_mapping.numpy(),
            expanded_idx_mapping=torch.repeat_interleave(idx_mapping, torch.tensor(num_logits)),
            expanded_local_pos=torch.cat([torch.arange(n, dtype=torch.int32) for n in num_logits]),
            seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens.clone())


class GrammarMasks:
    """StructuredOutputsWorker.apply_grammar_bitmask (vLLM 0.34.0 structured_outputs.py)
    without its CUDA copy stream: the same row mapping and vLLM's own kernel."""

    def __init__(self, mask_stride):
        self.mask_stride = mask_stride

    def apply_grammar_bitmask(self, logits, input_batch, grammar_req_ids, grammar_bitmask):
        req_id_to_idx = {req_id: i for i, req_id in enumerate(input_batch.req_ids)}
        mapping = [req_id_to_idx[r] * self.mask_stride + p for r in grammar_req_ids for p in range(self.mask_stride)]
        bitmask = torch.from_numpy(grammar_bitmask)
        grid = (bitmask.shape[0], math.ceil(logits.shape[-1] / GRAMMAR_BITMASK_BLOCK_SIZE))
        _apply_grammar_bitmask_kernel[grid](
            logits, logits.stride(0), torch.tensor(mapping, dtype=torch.int32), input_batch.cu_num_logits,
            bitmask, bitmask.stride(0), logits.shape[-1], MASK_STRIDE=self.mask_stride,
            BLOCK_SIZE=GRAMMAR_BITMASK_BLOCK_SIZE)


class Runner:
    """The attributes of GPUModelRunner that `sample` reads, and its body without batch
    sharding (vLLM 0.34.0 model_runner.py, GPUModelRunner.sample)."""

    def __init__(self, stack: Stack, lm_head: torch.Tensor, dtype: torch.dtype, runtime=None, options=None):
        self._selfjudge_runtime = runtime
        self._selfjudge_options = dict(options or {})
        self.sampler, self.rejection_sampler = stack.sampler, stack.rejection_sampler
        self.speculator = SimpleNamespace(draft_logits=stack.draft_logits)
        self.structured_outputs_worker = GrammarMasks(stack.mask_stride)
        self.model_state = SimpleNamespace(num_new_sampled_tokens_per_step=1,
                                           compute_sample_logits=lambda h: model_logits(h, lm_head, dtype))
        self.batch_sharder = None

    def sample(self, hidden_states, input_batch, grammar_output):
        sample_hidden_states = hidden_states[input_batch.logits_indices]
        logits = self.model_state.compute_sample_logits(sample_hidden_states)
        if grammar_output is not None and logits.shape[0] > 0:
            self.structured_outputs_worker.apply_grammar_bitmask(
                logits, input_batch, grammar_output.structured_output_request_ids, grammar_output.grammar_bitmask)
        sampler_output = self.rejection_sampler(logits, input_batch, self.speculator.draft_logits)
        return sampler_output, sampler_output.num_sampled, sampler_output.num_rejected


def model_logits(hidden, lm_head, dtype):
    """The model's logits in its own dtype (what compute_sample_logits returns)."""
    return (hidden.float() @ lm_head).to(dtype)


@dataclass
class Outcome:
    tokens: list[list[int]]
    logprobs: list[list[float]] | None  # the sampled token's logprob per emitted token


def run(stack_args: dict, requests: list[Request], hidden, lm_head, dtype, runtime=None, grammar=None,
        judged=True) -> Outcome:
    """One verification step through a fresh vLLM stack: `GPUModelRunner.sample` with the
    adapter's wrap (`judged`) or as stock vLLM."""
    stack = Stack(requests, **stack_args)
    options = {f"req-{i}": r.options for i, r in enumerate(requests) if r.options is not None}
    runner = Runner(stack, lm_head, dtype, runtime, options)
    sample = adapter_v2._wrap_sample(Runner.sample) if judged else Runner.sample
    with warnings.catch_warnings():
        # The kernels compute -inf - -inf in fully masked vocabulary blocks and discard it
        # (tl.where); the interpreter's numpy warns about it. Tokens are what is checked.
        warnings.simplefilter("ignore", RuntimeWarning)
        output, num_sampled, _ = sample(runner, hidden, stack.batch, grammar)
    tokens = [output.sampled_token_ids[i, : int(num_sampled[i])].tolist() for i in range(len(requests))]
    logprobs = None
    if output.logprobs_tensors is not None:
        cu = stack.batch.cu_num_logits_np
        column = output.logprobs_tensors.logprobs[:, 0]
        logprobs = [column[int(cu[i]) : int(cu[i]) + len(t)].tolist() for i, t in enumerate(tokens)]
    return Outcome(tokens, logprobs)


# -- an independent reference: sampling parameters and rules in plain torch --------------------

def reference_processed(raw: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Each row's logits after logit bias, penalties, bad words, temperature, min-p, top-k
    and top-p, written from vLLM's documented semantics (float32). raw: [rows, V], the
    model's logits after the grammar mask. Output tokens counted by penalties: the request's
    earlier output and the drafts before the row."""
    out, row = [], 0
    for request in requests:
        p = request.params
        for j in range(len(request.drafts) + 1):
            x = raw[row].float().clone()
            for token, bias in (p.logit_bias or {}).items():
                x[int(token)] += bias
            counts = torch.bincount(torch.tensor(request.output + request.drafts[:j], dtype=torch.long),
                                    minlength=VOCAB).float()
            if p.repetition_penalty != 1.0:
                seen = (counts > 0) | (torch.bincount(torch.tensor(request.prompt), minlength=VOCAB) > 0)
                scale = torch.where(seen, p.repetition_penalty, 1.0)
                x = torch.where(x > 0, x / scale, x * scale)
            x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
            for word in p.bad_words_token_ids or ():
                x[word[-1]] = -math.inf  # single-token words: always banned
            if p.temperature not in (0.0, 1.0):
                x = x / p.temperature
            if p.min_p > 0:
                x = torch.where(x < x.max() + math.log(p.min_p), -math.inf, x)
            if 0 < p.top_k < VOCAB:
                x = torch.where(x < x.topk(p.top_k).values[-1], -math.inf, x)
            if p.top_p < 1.0:
                probs = torch.softmax(x, -1)
                order = probs.argsort(descending=True)
                before = torch.cumsum(probs[order], 0) - probs[order]  # mass strictly above each token
                drop = torch.zeros(VOCAB, dtype=torch.bool)
                drop[order] = before >= p.top_p
                x = torch.where(drop, -math.inf, x)
            out.append(x)
            row += 1
    return torch.stack(out)


def draft_rows(requests):
    """(logits row, draft token, drafts after it in its request) of every draft."""
    rows, start = [], 0
    for request in requests:
        n = len(request.drafts)
        rows += [(start + j, d, n - 1 - j) for j, d in enumerate(request.drafts)]
        start += n + 1
    return rows


def entropy(x):
    p = torch.softmax(x, -1)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def topk_entropy(x, k):
    log_p = torch.log_softmax(x, -1).topk(k).values
    return float(-(log_p.exp() * log_p).sum())


@dataclass
class ReferenceRule:
    """One rule's decision written out row by row (rules.py's semantics, not its code)."""

    name: str  # judge_hidden, judge_logits, top_alpha, entropy, fly, accept_all, off
    knob: float = 0.0
    window: int = 2
    top_k: int = 3

    def statistic(self, r, d, after, proc, raw, hidden, head_weight, scalar_weight):
        """The number this rule compares against its knob on row r (None: no decision)."""
        if self.name == "judge_hidden":
            return float(hidden[r + 1].float() @ head_weight)
        if self.name == "judge_logits":
            lp = torch.log_softmax(raw.float(), -1)
            features = {"draft_logratio": float(raw[r, d].float() - raw[r].float().max()),
                        "verify_confidence": float(lp[r].max()), "next_confidence": float(lp[r + 1].max())}
            return sum(w * features[name] for w, name in zip(scalar_weight.tolist(), LOGIT_FEATURES))
        if self.name == "top_alpha":
            return float(proc[r, d] - proc[r].max())
        if self.name == "entropy":
            return entropy(proc[r])
        if self.name == "fly":
            return topk_entropy(proc[r], self.top_k)
        return None

    def accepts(self, r, d, after, proc, raw, hidden, head_weight, scalar_weight, drafts_of_row):
        if d < 0 or proc[r, d] == -math.inf or self.name == "off":
            return False
        if self.name == "accept_all":
            return True
        if self.statistic(r, d, after, proc, raw, hidden, head_weight, scalar_weight) < self.knob:
            return False
        if self.name == "entropy":
            # Evidence needs a later draft; the window stops at the request's end.
            return after > 0 and all(int(proc[r + o].argmax()) == drafts_of_row[r + o]
                                     for o in range(1, min(self.window, after) + 1))
        if self.name == "fly":
            return after >= self.window > 0 and all(int(proc[r + o].argmax()) == drafts_of_row[r + o]
                                                    for o in range(1, self.window + 1))
        return True


def midpoint_knob(values: list[float]) -> float:
    """A knob in the widest gap near the median of `values`, so that float rounding in the
    two implementations cannot put a row on different sides of it."""
    values = sorted(v for v in values if math.isfinite(v))
    if len(values) < 2:
        return 0.0
    lo, hi = len(values) // 4, max(len(values) // 4 + 1, 3 * len(values) // 4)
    best = max(range(lo, min(hi, len(values) - 1)), key=lambda i: values[i + 1] - values[i])
    return (values[best] + values[best + 1]) / 2


# -- fixtures ----------------------------------------------------------------------------------

SAMPLINGS = {
    "greedy": dict(temperature=0.0),
    "temperature_1": dict(temperature=1.0),  # no processing: vLLM verifies the model's own tensor
    "temperature_0.7_topk_topp_minp": dict(temperature=0.7, top_k=24, top_p=0.9, min_p=0.02),
    "penalties": dict(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.4),
    "bias_bad_words": dict(temperature=0.0, logit_bias={7: 2.5, 11: -3.0}, _bad_words_token_ids=[[13], [17]]),
}


def fixture(seed, dtype, sampling, logprobs, drafts_per_request=(4, 3, 5, 4)):
    """Hidden states, an LM head and requests whose drafts take the target's top choice,
    one of its next choices, a banned or random token."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(n + 1 for n in drafts_per_request)
    hidden = torch.randn(rows, HIDDEN, generator=gen).to(dtype)
    lm_head = torch.randn(HIDDEN, VOCAB, generator=gen) * 0.6
    raw = model_logits(hidden, lm_head, dtype).float()
    requests, start = [], 0
    for i, n in enumerate(drafts_per_request):
        drafts = []
        for j in range(n):
            top = raw[start + j].topk(4).indices.tolist()
            u = float(torch.rand((), generator=gen))
            drafts.append(top[0] if u < 0.55 else top[1 + int(u * 10) % 3] if u < 0.88
                          else [13, 17, 7][j % 3] if u < 0.92 else int(torch.randint(0, VOCAB, (), generator=gen)))
        params = SamplingParams(seed=1000 + 17 * seed + i, logprobs=None if logprobs == "none" else 1,
                                **SAMPLINGS[sampling])
        output = torch.randint(0, VOCAB, (3,), generator=gen).tolist()
        requests.append(Request(drafts, params, output=output, last=int(output[-1])))
        start += n + 1
    return hidden, lm_head, requests


def grammar_for(requests, mask_stride, seed):
    """A structured-output bitmask for requests 0 and 2: each row allows ~70% of the
    vocabulary (bit set = allowed)."""
    gen = np.random.default_rng(seed)
    ids = ["req-0", "req-2"]
    allowed = gen.random((len(ids) * mask_stride, VOCAB)) < 0.7
    words = math.ceil(VOCAB / 32)
    bitmask = np.zeros((len(ids) * mask_stride, words), dtype=np.int64)
    for t in range(VOCAB):
        bitmask[:, t // 32] |= allowed[:, t].astype(np.int64) << (t % 32)
    bitmask = bitmask.astype(np.uint32).view(np.int32)
    return SimpleNamespace(structured_output_request_ids=ids, grammar_bitmask=bitmask), allowed


def masked_raw(hidden, lm_head, dtype, requests, grammar_allowed):
    """The model's logits with the grammar applied (the adapter's raw logits), float32."""
    raw = model_logits(hidden, lm_head, dtype).float()
    if grammar_allowed is not None:
        stride = grammar_allowed.shape[0] // 2
        starts = np.concatenate([[0], np.cumsum([len(r.drafts) + 1 for r in requests])])
        for k, i in enumerate((0, 2)):
            for p in range(len(requests[i].drafts) + 1):
                raw[starts[i] + p, ~torch.from_numpy(grammar_allowed[k * stride + p])] = -math.inf
    return raw


# -- the matrix ---------------------------------------------------------------------------------

FACTORS = {
    "dtype": ("float32", "bfloat16", "float16"),
    "sampling": tuple(SAMPLINGS),
    "logprobs": ("none", "raw_logprobs", "processed_logprobs"),
    "grammar": (False, True),
    "draft": ("greedy", "probabilistic"),
    "rule": ("judge_hidden", "judge_logits", "top_alpha", "entropy", "fly", "mixed", "lossless_per_request"),
}


def all_pairs(factors: dict, seed=0) -> list[dict]:
    """Cells such that every pair of values of any two factors is in at least one cell
    (a greedy pairwise cover; deterministic for a seed)."""
    names = list(factors)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rng, cells = random.Random(seed), []
    while uncovered:
        target = min(uncovered, key=repr)  # start each cell from an uncovered pair
        best, best_gain = None, -1
        for _ in range(60):
            cell = {n: rng.choice(factors[n]) for n in names}
            cell[target[0]], cell[target[2]] = target[1], target[3]
            gain = sum((a, cell[a], b, cell[b]) in uncovered for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = cell, gain
        cells.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cells


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_cell(cell: dict, seed: int) -> str:
    dtype = DTYPES[cell["dtype"]]
    hidden, lm_head, requests = fixture(seed, dtype, cell["sampling"], cell["logprobs"])
    mask_stride = max(len(r.drafts) for r in requests) + 1
    grammar, allowed = grammar_for(requests, mask_stride, seed) if cell["grammar"] else (None, None)
    raw = masked_raw(hidden, lm_head, dtype, requests, allowed)
    proc = reference_processed(raw, requests)
    stack_args = {"logprobs_mode": "raw_logprobs" if cell["logprobs"] == "none" else cell["logprobs"]}
    if cell["draft"] == "probabilistic":
        gen = torch.Generator().manual_seed(seed + 1)
        num_spec = mask_stride - 1
        draft_logits = torch.randn(len(requests), num_spec, VOCAB, generator=gen) * 0.5
        for i, request in enumerate(requests):  # the drafter's distribution puts mass on its drafts
            for j, d in enumerate(request.drafts):
                draft_logits[i, j, d] += 2.0
        stack_args["draft_logits"] = draft_logits.to(dtype)

    # Judge off is stock verification, token for token, logprobs included.
    stock = run(stack_args, requests, hidden, lm_head, dtype, judged=False, grammar=grammar)
    off = run(stack_args, requests, hidden, lm_head, dtype, JudgeRuntime(None, None, 0.0, LOSSLESS), grammar)
    assert off == stock, ("judge off differs from stock", off, stock)

    # The rules of each request, and the reference's decisions.
    head_weight = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed + 2))
    scalar_weight = torch.tensor([1.0, 0.5, -0.5])
    rows = draft_rows(requests)
    drafts_of_row = {r: d for r, d, _ in rows}
    args = (proc, raw, hidden, head_weight, scalar_weight)

    def reference(name, **kw):
        rule = ReferenceRule(name, **kw)
        stats = [rule.statistic(r, d, a, *args) for r, d, a in rows]
        if stats[0] is not None:
            rule.knob = midpoint_knob([s for s, (r, d, _) in zip(stats, rows) if d >= 0 and proc[r, d] > -math.inf])
        return rule

    def served(rule: ReferenceRule) -> RowRule:
        if rule.name in ("judge_hidden", "judge_logits"):
            return RowRule(JUDGE, rule.knob)
        if rule.name == "top_alpha":
            return RowRule.named("top_alpha", math.exp(rule.knob))
        if rule.name in ("entropy", "fly"):
            return RowRule.named(rule.name, rule.knob)
        return ACCEPT_ALL if rule.name == "accept_all" else LOSSLESS

    name = cell["rule"]
    head = None
    if name == "judge_logits":
        head = JudgeHead(None, torch.tensor(0.0), scalar_weight, LOGIT_FEATURES)
    elif name in ("judge_hidden", "mixed"):
        head = JudgeHead(head_weight, torch.tensor(0.0))
    if name == "mixed":
        per_request = [reference("judge_hidden"), reference("top_alpha"), reference("entropy", window=2),
                       ReferenceRule("off")]
    elif name == "lossless_per_request":
        per_request = [ReferenceRule("accept_all"), ReferenceRule("off"), ReferenceRule("accept_all"),
                       ReferenceRule("off")]
    else:
        kw = {"window": 2, "top_k": 3} if name == "fly" else {"window": 1} if name == "entropy" else {}
        per_request = [reference(name, **kw)] * len(requests)
    rules_by_key = {}
    for i, (request, rule) in enumerate(zip(requests, per_request)):
        request.options = {"rule_key": i}
        rules_by_key[i] = served(rule)
    runtime = JudgeRuntime(head, None, 0.0, LOSSLESS, lambda extra: rules_by_key[extra["rule_key"]],
                           entropy_window=1 if name == "entropy" else 2, fly_window=2, fly_top_k=3)
    on = run(stack_args, requests, hidden, lm_head, dtype, runtime, grammar)

    accept, start = {}, 0
    for request, rule in zip(requests, per_request):
        n = len(request.drafts)
        for j, d in enumerate(request.drafts):
            accept[start + j] = rule.accepts(start + j, d, n - 1 - j, *args, drafts_of_row)
        start += n + 1

    # Expected tokens: greedy requests walked by hand on the reference's processed logits;
    # sampled ones are stock vLLM on logits where exactly the reference's accepted drafts
    # dominate (the same random draws then decide every other row).
    forced = model_logits(hidden, lm_head, dtype).float()
    for r, ok in accept.items():
        if ok:
            forced[r, drafts_of_row[r]] = 1e30
    expected = run_with_logits(stack_args, requests, forced, grammar)
    start = 0
    for i, request in enumerate(requests):
        if request.params.temperature == 0.0:
            tokens = []
            for j, d in enumerate(request.drafts):
                top = int(proc[start + j].argmax())
                if d >= 0 and (d == top or accept[start + j]):
                    tokens.append(d)
                    continue
                tokens.append(top)
                break
            else:
                tokens.append(int(proc[start + len(request.drafts)].argmax()))
            assert tokens == expected.tokens[i], ("hand-walked greedy reference", i, tokens, expected.tokens[i])
        start += len(request.drafts) + 1
    assert on.tokens == expected.tokens, ("judged tokens differ from the reference", on.tokens, expected.tokens)

    # Logprobs of the emitted tokens are the target's own (forced entries written back).
    if cell["logprobs"] != "none":
        source = raw if cell["logprobs"] == "raw_logprobs" else proc
        lp = torch.log_softmax(source, -1)
        start = 0
        for i, request in enumerate(requests):
            want = [float(lp[start + k, t]) for k, t in enumerate(on.tokens[i])]
            got = on.logprobs[i]
            assert all((w == g) or abs(w - g) < 2e-3 for w, g in zip(want, got)), ("logprobs", i, want, got)
            start += len(request.drafts) + 1
    else:
        assert on.logprobs is None
    relaxed = sum(accept.values())
    return f"{relaxed} drafts accepted by the rules"


def run_with_logits(stack_args, requests, logits32, grammar):
    """Stock vLLM verification of given float32 model logits (the reference's forced run)."""
    stack = Stack(requests, **stack_args)
    runner = Runner(stack, None, torch.float32)
    runner.model_state.compute_sample_logits = lambda h: logits32.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # as in run()
        output, num_sampled, _ = Runner.sample(runner, torch.zeros(logits32.shape[0], HIDDEN), stack.batch, grammar)
    return Outcome([output.sampled_token_ids[i, : int(num_sampled[i])].tolist() for i in range(len(requests))], None)


# -- focused checks ------------------------------------------------------------------------------

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def runner_sample_matches_vllm():
    """The replica of GPUModelRunner.sample calls what vLLM 0.34.0's does, in that order
    (read from its source: the module needs llguidance to import)."""
    source = inspect.getsourcefile(vllm_verify).replace("spec_decode/rejection_sampler.py", "model_runner.py")
    tree = ast.parse(open(source).read())
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GPUModelRunner")
    sample = next(n for n in runner.body if isinstance(n, ast.FunctionDef) and n.name == "sample")
    text = ast.unparse(sample)
    for needle in ("hidden_states[input_batch.logits_indices]", "self.model_state.compute_sample_logits(",
                   "self.structured_outputs_worker.apply_grammar_bitmask(", "self.rejection_sampler(logits, input_batch",
                   "self.speculator.draft_logits"):
        assert needle in text, needle
    assert text.index("apply_grammar_bitmask") < text.index("self.rejection_sampler(logits"), "order changed"


@check
def float16_at_temperature_1_accepts_forced_drafts():
    """Issue 43: at temperature 1.0 with no processing vLLM verifies the model's own
    float16 logits tensor; a forced entry must stay finite there (1e30 is +inf in float16,
    and the kernel's exp(inf - inf) is NaN: the forced draft is rejected and the
    replacement drawn from NaN). Accept-all must emit every draft, in every dtype."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        hidden, lm_head, requests = fixture(7, dtype, "temperature_1", "none")
        raw = model_logits(hidden, lm_head, dtype).float()
        for request, start in zip(requests, np.cumsum([0] + [len(r.drafts) + 1 for r in requests])):
            # Drafts the target would not pick (not its argmax).
            request.drafts = [int(raw[start + j].argsort()[-2 - j % 3]) for j in range(len(request.drafts))]
        got = run({}, requests, hidden, lm_head, dtype, JudgeRuntime(None, None, 0.0, ACCEPT_ALL))
        for request, tokens in zip(requests, got.tokens):
            assert tokens[:-1] == request.drafts and len(tokens) == len(request.drafts) + 1, (dtype, tokens,
                                                                                            request.drafts)


@check
def probabilistic_draft_sampling_accepts_forced_drafts():
    """draft_sample_method="probabilistic": the kernels read the drafter's cached logits
    (p_target(draft) > u * q(draft)); a forced draft (p_target = 1) is accepted whatever q."""
    for dtype, sampling in ((torch.float16, "temperature_1"), (torch.float16, "temperature_0.7_topk_topp_minp"),
                            (torch.float32, "temperature_0.7_topk_topp_minp")):
        hidden, lm_head, requests = fixture(8, dtype, sampling, "none")
        num_spec = max(len(r.drafts) for r in requests)
        cached = torch.randn(len(requests), num_spec, VOCAB, generator=torch.Generator().manual_seed(3))
        for i, request in enumerate(requests):  # a confident drafter: q(draft) near 1
            cached[i, torch.arange(len(request.drafts)), request.drafts] += 8.0
        draft_logits = {"draft_logits": cached.to(dtype)}
        got = run(draft_logits, requests, hidden, lm_head, dtype, JudgeRuntime(None, None, 0.0, ACCEPT_ALL))
        stock = run(draft_logits, requests, hidden, lm_head, dtype, judged=False)
        assert sum(map(len, stock.tokens)) < sum(map(len, got.tokens)), "stock should reject some drafts here"
        proc = reference_processed(model_logits(hidden, lm_head, dtype).float(), requests)
        start = 0
        for request, tokens in zip(requests, got.tokens):
            # Drafts outside top-k/top-p/min-p stay rejected; every other one is emitted.
            kept = 0
            while kept < len(request.drafts) and proc[start + kept, request.drafts[kept]] > -math.inf:
                kept += 1
            assert tokens[:kept] == request.drafts[:kept], (dtype, tokens, request.drafts, kept)
            assert len(tokens) == kept + 1, (dtype, tokens, kept)
            start += len(request.drafts) + 1


@check
def chunked_verification_decides_the_same_rows():
    """vLLM verifies a large batch in chunks of whole requests; with four chunks and a rule
    per request (the per-request table is staged once per chunk) the tokens equal one chunk."""
    hidden, lm_head, requests = fixture(4, torch.float32, "greedy", "none", drafts_per_request=(4, 3, 5, 4, 2, 3))
    head = JudgeHead(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9)), torch.tensor(0.0))
    threshold = float((hidden @ head.weight).median())
    rules = [RowRule(JUDGE, threshold), RowRule.named("top_alpha", 0.3), RowRule.named("entropy", 2.0), LOSSLESS]
    for i, request in enumerate(requests):
        request.options = {"rule_key": i % 4}

    def runtime():
        return JudgeRuntime(head, None, 0.0, LOSSLESS, lambda extra: rules[extra["rule_key"]], entropy_window=1)

    whole = run({}, requests, hidden, lm_head, torch.float32, runtime())
    saved = vllm_verify.MAX_CHUNK_BYTES
    vllm_verify.MAX_CHUNK_BYTES = VOCAB * 4 * 6  # at most 6 logits rows per chunk: 4 chunks here
    try:
        chunked = run({}, requests, hidden, lm_head, torch.float32, runtime())
    finally:
        vllm_verify.MAX_CHUNK_BYTES = saved
    assert chunked == whole, (chunked, whole)
    stock = run({}, requests, hidden, lm_head, torch.float32, judged=False)
    assert chunked != stock, "the rules should relax something on this fixture"


@check
def placeholder_drafts_are_never_accepted():
    hidden, lm_head, requests = fixture(5, torch.float32, "greedy", "none")
    requests[0].drafts[1] = -1  # request 0's second draft is a placeholder (async scheduling)
    got = run({}, requests, hidden, lm_head, torch.float32, JudgeRuntime(None, None, 0.0, ACCEPT_ALL))
    assert len(got.tokens[0]) == 2, got.tokens[0]  # first draft accepted, then the target's own token


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
    target = logits.scatter(1, candidates, boost)
    lm_head_rows = torch.linalg.lstsq(hidden, target).solution  # hidden @ lm_head_rows ~= target
    requests, start = [], 0
    for i, n in enumerate(drafts_per_request):
        drafts = []
        for j in range(n):
            top = (hidden[start + j] @ lm_head_rows).topk(3).indices
            u = float(torch.rand((), generator=gen))
            drafts.append(int(top[0]) if u < 0.6 else int(top[1 + (u < 0.85)]) if u < 0.95
                          else int(torch.randint(0, VOCAB, (), generator=gen)))
        requests.append(Request(drafts, SamplingParams(temperature=0.0, seed=i)))
        start += n + 1
    return hidden, lm_head_rows, requests


@check
def the_fly_rule_takes_vllms_own_fly_decisions_greedy():
    """vLLM 0.34.0's FLy (rejection_sample_method="fly", the kernels' deferred window) and the
    plugin's `fly` rule on standard verification emit the same tokens, greedy, over windows,
    thresholds and top-k."""
    compared = differing_from_stock = 0
    for seed in range(12):
        hidden, lm_head, requests = fly_fixture(seed)
        stock = run({}, requests, hidden, lm_head, torch.float32, judged=False)
        for window, threshold, top_k in ((5, 0.3, 3), (2, 0.3, 3), (1, 0.6, 2), (3, 0.1, 5)):
            vllms = run({"rejection_sample_method": "fly", "fly_window_size": window,
                         "fly_entropy_threshold": threshold, "fly_entropy_top_k": top_k},
                        requests, hidden, lm_head, torch.float32, judged=False)
            ours = run({}, requests, hidden, lm_head, torch.float32,
                       JudgeRuntime(None, None, 0.0, RowRule.named("fly", threshold), fly_window=window,
                                    fly_top_k=top_k))
            assert ours.tokens == vllms.tokens, (seed, window, threshold, top_k, ours, vllms)
            compared += 1
            differing_from_stock += ours.tokens != stock.tokens
    assert differing_from_stock >= compared // 3, (differing_from_stock, compared)  # FLy did relax here


@check
def a_step_verified_elsewhere_fails_loudly():
    hidden, lm_head, requests = fixture(6, torch.float32, "greedy", "none")
    stack = Stack(requests)
    runner = Runner(stack, lm_head, torch.float32, JudgeRuntime(None, None, 0.0, ACCEPT_ALL))

    def sample_without_verification(self, hidden_states, input_batch, grammar_output):
        return None, None, None

    try:
        adapter_v2._wrap_sample(sample_without_verification)(runner, hidden, stack.batch, None)
    except Exception as exc:  # JudgeNotAppliedError
        assert "routes verification elsewhere" in str(exc), exc
    else:
        raise AssertionError("a step whose drafts were not judged must fail")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=0, help="matrix cells to run (0: the all-pairs cover)")
    parser.add_argument("--only", default="", help="run only the checks whose name contains this")
    args = parser.parse_args()
    assert vllm.__version__.startswith("0.34"), vllm.__version__
    _install(f"{adapter_v2.VERIFY}:RejectionSampler.__call__", adapter_v2._wrap_verify_call)
    _install(f"{adapter_v2.VERIFY}:rejection_sample", adapter_v2._wrap_rejection_sample)
    passed = failed = 0

    def report(name, fn):
        nonlocal passed, failed
        try:
            note = fn()
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
        else:
            passed += 1
            print(f"ok {name}" + (f" ({note})" if note else ""), flush=True)

    for fn in CHECKS:
        if args.only in fn.__name__:
            report(fn.__name__, fn)
    if not args.only or "matrix" in args.only:
        cells = all_pairs(FACTORS)
        total = math.prod(len(v) for v in FACTORS.values())
        if args.cells:
            cells = cells[: args.cells]
        print(f"matrix: {len(cells)} cells of {total} (an all-pairs cover: every pair of values of any two "
              f"factors in some cell)", flush=True)
        for k, cell in enumerate(cells):
            report("matrix " + " ".join(f"{n}={v}" for n, v in cell.items()), lambda c=cell, k=k: check_cell(c, k))
    print(f"vLLM {vllm.__version__}: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
