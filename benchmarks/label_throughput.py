"""Labelled mismatches per second: this pipeline vs the authors'-style baseline.

Same models, same prompts, same machine, one run. Both start from the same target
responses (the `responses` stage of a label run) and produce semantic preservation scores
for every draft/target mismatch:

  pipeline  `selfjudge label`'s mismatches + scores stages: vLLM batched prompt_logprobs on
            the draft and target, only the window each score needs
  baseline  written the way the released SelfJudge code works: transformers, batch size 1,
            a teacher-forced draft forward per response, one target forward of the response,
            then one full forward of the whole substituted sequence per mismatch

Prints mismatches/s for both, the ratio, the largest score difference between them, and the
target positions each side computes per mismatch: the pipeline's windows against their
bound (N + 1 positions, plus on average half a KV block that the prefix cache cannot serve),
the pipeline's one forward of each original response, and the baseline's full sequences.

    python benchmarks/label_throughput.py                      # tiny random models
    python benchmarks/label_throughput.py --target T --draft D --prompts P.jsonl --first 6 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


class StageTimer:
    """A `progress` callable for run_label that times the work between items, so engine
    start-up (paid once per stage, whatever the data size) can be reported apart."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, items, desc="", **_):
        for item in items:
            start = time.perf_counter()
            yield item
            self.seconds[desc] = self.seconds.get(desc, 0.0) + time.perf_counter() - start


def baseline_scores(target_dir, draft_dir, responses, suffix_length, dtype):
    """The released code's way: batch 1, full sequences, one forward per mismatch."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype, torch.float32)
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch_dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch_dtype).eval()
    out = {}
    start = time.perf_counter()
    with torch.no_grad():
        for r in responses:
            y = r["prompt"] + r["response"]
            ids = torch.tensor([y])
            draft_top = draft(ids).logits[0].argmax(-1)
            lp_y = torch.log_softmax(target(ids).logits[0].float(), -1)
            for m in range(len(r["prompt"]), len(y)):
                d = int(draft_top[m - 1])
                if d == y[m]:
                    continue
                y_sub = y[:m] + [d] + y[m + 1 :]
                lp_sub = torch.log_softmax(target(torch.tensor([y_sub])).logits[0].float(), -1)
                end = min(m + suffix_length + 1, len(y))
                s_orig = torch.stack([lp_y[i - 1, y[i]] for i in range(m, end)]).mean()
                terms = [lp_sub[m - 1, d]] + [lp_sub[i - 1].max() for i in range(m + 1, end)]
                out[(r["id"], m)] = float(s_orig - torch.stack(terms).mean())
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--first", type=int, default=None, help="only the first N prompts of --prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--suffix-length", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=None, help="KV block size for the pipeline")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from selfjudge_vllm.offline.engine import EngineSettings
    from selfjudge_vllm.offline.label import LabelSettings, run_label
    from selfjudge_vllm.offline.store import RunDir

    work = Path(tempfile.mkdtemp(prefix="label-throughput-"))
    if args.target is None:
        from selfjudge_vllm.testing.tiny_models import PROMPTS, build_target_and_draft

        args.target, args.draft = build_target_and_draft(work / "models")
        args.prompts = work / "prompts.jsonl"
        args.prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    if args.first is not None:
        subset = work / "prompts.jsonl"
        with args.prompts.open() as rows:
            subset.write_text("".join(row for _, row in zip(range(args.first), rows)))
        args.prompts = subset
    settings = LabelSettings(
        target=str(args.target), draft=str(args.draft), prompts=str(args.prompts),
        suffix_lengths=(args.suffix_length,), max_new_tokens=args.max_new_tokens,
        shard_size=args.shard_size,
        engine=EngineSettings(dtype=args.dtype, max_model_len=args.max_model_len,
                              block_size=args.block_size),
    )
    run_dir = work / "run"
    quiet = lambda items, **_: items  # noqa: E731
    run_label(settings, run_dir, progress=quiet)  # full run once (also warms caches)
    run = RunDir(run_dir)
    responses = run.read_stage("responses")

    # Pipeline: redo the mismatches + scores stages (features are not the baseline's work).
    for stage in ("mismatches", "scores", "features"):
        shutil.rmtree(run_dir / stage)
    timer = StageTimer()
    run_label(settings, run_dir, progress=timer)
    pipeline_s = timer.seconds["mismatches"] + timer.seconds["scores"]
    ours = {(r["id"], r["m"]): r["scores"]["max"][str(args.suffix_length)]
            for r in run.read_stage("scores")}

    theirs, baseline_s = baseline_scores(args.target, args.draft, responses, args.suffix_length, args.dtype)

    common = ours.keys() & theirs.keys()
    # Target positions computed per mismatch. A window runs to window_end and reads y[:m] from
    # the prefix cache in whole blocks (a window redone without the cache has cached_prefix 0).
    from selfjudge_vllm.offline.scores import window_end

    sequence_length = {r["id"]: len(r["prompt"]) + len(r["response"]) for r in responses}
    scored = run.read_stage("scores")
    window_positions = sum(window_end(r["m"], args.suffix_length, sequence_length[r["id"]]) - r["cached_prefix"]
                           for r in scored) / max(1, len(scored))
    block = args.block_size or 128  # vLLM's CPU default
    window_bound = args.suffix_length + 1 + block / 2
    figures = {
        "mismatches_pipeline": len(ours),
        "mismatches_baseline": len(theirs),
        "mismatches_in_both": len(common),
        "pipeline_s": pipeline_s,  # stage work, engine start-up excluded
        "baseline_s": baseline_s,  # scoring loop, model loading excluded
        "pipeline_mismatches_per_s": len(ours) / pipeline_s,
        "baseline_mismatches_per_s": len(theirs) / baseline_s,
        "max_abs_score_diff": max(abs(ours[k] - theirs[k]) for k in common),
        "target_positions_per_mismatch": {
            "pipeline_windows": window_positions,
            "window_bound": window_bound,  # N + 1 + half a KV block
            "pipeline_windows_over_bound": window_positions / window_bound,
            "pipeline_original_responses": sum(sequence_length.values()) / max(1, len(scored)),
            "baseline": sum(sequence_length[key[0]] for key in theirs) / max(1, len(theirs)),
        },
        "setup": {"target": str(args.target), "draft": str(args.draft), "prompts": len(responses),
                  "max_new_tokens": args.max_new_tokens, "suffix_length": args.suffix_length,
                  "dtype": args.dtype, "block_size": args.block_size,
                  "cached_prefix_tokens_mean": sum(
                      r.get("cached_prefix", 0) for r in run.read_stage("scores")) / max(1, len(ours))},
    }
    figures["speedup"] = figures["pipeline_mismatches_per_s"] / figures["baseline_mismatches_per_s"]
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
