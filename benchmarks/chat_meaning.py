"""The chat benchmark (issue 42, item 3): relaxed acceptance on open-ended traffic, certified
by `selfjudge calibrate` itself on meaning, with no reference answers.

    prompts     ShareGPT first turns of the benchmark split (benchmarks/chat_tasks.py
                SHAREGPT_SPLITS["benchmark"]: disjoint from the judge's training prompts, the
                scorer validation pairs and the paper-judge label prompts) as a calibrate prompt
                file, RESULTS/chat_meaning/prompts.jsonl (chat messages; calibrate renders them
                with the target's template)
    calibrate   per server, `selfjudge calibrate` with each measure, scorer and budget of
                MEASUREMENTS in turn, each its own certificate in its own folder
                (OUT/<server>/<measurement>), all sharing one response store
                (OUT/<server>/store, linked as each folder's store): the responses are served
                once and each later measurement only serves and scores what it lacks; every
                family's grid, FLy at vLLM's default 0.3, stricter points, and one looser (0.2)
    full        per server, once every measurement's calibrate run is complete: each rule
                family's fastest point that calibrate served (the highest acceptance against
                lossless, the family's points compared on the calibration prompts all of them
                were served on; chosen once, OUT/<server>/full/plan.json)
                served on every prompt, calibration and test, into the same store with
                calibrate's own server settings (OUT/<server>/full is one more folder on it),
                then scored by the embedding scorer and, with --llm, the LLM scorer and judged
                loss, as calibrate scores: the matched-acceptance comparison across families
    report      RESULTS/chat_meaning/report.{json,md,png} (benchmarks/chat_meaning_report.py)
                from the committed files alone, nothing served or scored: every served point
                on every measure that scored it, what each measurement certified and its test
                prompts' check, and the full points; pre-declared measurements, none chosen
                among the others (each calibrate report lists the others computed on its store)

Resumable like calibrate (a rerun continues; --max-minutes ends a sitting between segments):

    python benchmarks/chat_meaning.py --testbed testbed-qwen --stages prompts,calibrate --servers ngram:8 --max-minutes 100
    python benchmarks/chat_meaning.py --testbed testbed-qwen --stages full --llm --max-minutes 100
    python benchmarks/chat_meaning.py --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks import chat_tasks  # noqa: E402
from benchmarks.runner import speculative_config  # noqa: E402
from selfjudge_vllm import calibrate  # noqa: E402
from selfjudge_vllm.meaning import MeaningJudge, Pair, ScorerSettings, request_text  # noqa: E402
from selfjudge_vllm.measurement import (  # noqa: E402
    Progress,
    RequestStore,
    log,
    measure_point,
    needs_work,
    request_options,
)

RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "chat_meaning"
MAX_TOKENS = 256
# In order: the cheap scorer first (it decides the early stops, so it serves), then the
# LLM scorer and judged loss on what was served; each at 5% and 10%.
MEASUREMENTS = (
    ("meaning_changes", "embedding", 0.05), ("meaning_changes", "embedding", 0.10),
    ("meaning_changes", "llm", 0.05), ("meaning_changes", "llm", 0.10),
    ("judged_loss", None, 0.05), ("judged_loss", None, 0.10),
)
FLY_GRID = "fly=1.0,0.8,0.6,0.45,0.3,0.2"  # vLLM's default 0.3, stricter points (first), one looser (0.2)
FULL = "full"  # OUT/<server>/full: the full stage's folder on the server's store
PLAN_FILE = "plan.json"  # in it: the points served in full, chosen once
SCORE_CHUNK = 16  # pairs per scoring call: each is persisted as it is decided; --max-minutes is read between calls
# The judge this benchmark serves: the paper's head trained for this traffic by
# benchmarks/chat_judge_scaling.py (hidden state and logit features, all 6,029 training
# mismatches of ShareGPT responses, ngram and draft_model drafts). It has the highest held-out
# ROC-AUC of that script's 15 heads (0.906, tied with logits-only within +-0.003; ngram drafts
# 0.976), where the first chat head (RESULTS/chat_judge/head: logits, 965 draft_model
# mismatches of GSM8K responses) never saw an ngram draft. The store was begun with that first
# head, so this head's judge points carry its tag (calibrate.store_head_tag).
BENCHMARK_HEAD = RESULTS / "chat_judge_scaling" / "heads" / "both-10000"


def write_prompts(args) -> Path:
    path = OUT / "prompts.jsonl"
    rows = [{"id": pid, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
            for pid, text in chat_tasks.sharegpt_split("benchmark", args.prompts)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.is_file() and path.read_text() != text:
        sys.exit(f"chat_meaning: {path} holds other prompts; calibrate binds its folders to the file (keep it)")
    path.write_text(text)
    log(f"prompts: {len(rows)} in {path}")
    return path


def server_name(server: tuple[str, int]) -> str:
    """OUT/<this>: e.g. ngram-k8."""
    return f"{server[0]}-k{server[1]}"


def measurement_name(measure: str, scorer: str | None, budget: float) -> str:
    """A measurement's folder in OUT/<server>: <measure>[-<scorer>]-<budget>pct."""
    return f"{measure}{'-' + scorer if scorer else ''}-{100 * budget:g}pct"


def scorer_label(measure: str, scorer: str | None) -> str:
    """How the report names a measurement's scorer: embedding, llm (meaning changes) or judged_loss."""
    return scorer if measure == "meaning_changes" else measure


def scorer_settings() -> dict[str, ScorerSettings]:
    """The scorers of MEASUREMENTS by scorer_label, as calibrate builds them from the commands
    calibrate_command writes (no --scorer-model or --scorer-threshold: each scorer's defaults)."""
    return {scorer_label(m, s): ScorerSettings.make(m, s, None, None) for m, s, _ in MEASUREMENTS}


def linked_folder(server: tuple[str, int], name: str) -> Path:
    """OUT/<server>/<name>, its `store` a link to the server's shared store (the responses
    depend only on the server and the prompts, which every folder binds)."""
    root = OUT / server_name(server)
    folder = root / name
    (root / "store").mkdir(parents=True, exist_ok=True)
    folder.mkdir(exist_ok=True)
    if not (folder / "store").exists():
        (folder / "store").symlink_to(Path("..") / "store", target_is_directory=True)
    return folder


def measurement_folder(server: tuple[str, int], measure: str, scorer: str | None, budget: float) -> Path:
    """OUT/<server>/<measure>[-<scorer>]-<budget>pct on the server's shared store."""
    return linked_folder(server, measurement_name(measure, scorer, budget))


def calibrated_head(root: Path) -> str | None:
    """The SHA-256 of the head OUT/<server>'s measurements were calibrated with, as their
    folders bound it (None before any was begun); measurements bound to two heads are refused."""
    bound = {json.loads(path.read_text())["head_sha256"]
             for path in (root / measurement_name(*m) / "settings.json" for m in MEASUREMENTS) if path.is_file()}
    if len(bound) > 1:
        sys.exit(f"chat_meaning: {root}'s measurements were calibrated with {len(bound)} different heads; one "
                 "report and one full stage compare one head's points")
    return bound.pop() if bound else None


def calibrate_command(args, server: tuple[str, int], measure: str, scorer: str | None, budget: float) -> list[str]:
    spec = speculative_config(server, args.testbed / "draft")
    command = [sys.executable, "-m", "selfjudge_vllm.cli", "calibrate", "--target", str(args.testbed / "target"),
               "--head", str(args.head), "--speculative-config", json.dumps(spec), "--prompts",
               str(OUT / "prompts.jsonl"), "--out", str(measurement_folder(server, measure, scorer, budget)),
               "--measure", measure,
               "--budget", str(budget), "--grid", FLY_GRID, "--dtype", "float32", "--max-model-len", "4096",
               "--max-tokens", str(MAX_TOKENS)]
    if scorer:
        command += ["--scorer", scorer]
    if args.max_minutes:
        command += ["--max-minutes", str(args.max_minutes)]
    return command


def run_calibrate(args) -> None:
    for server in args.servers:
        for measure, scorer, budget in MEASUREMENTS:
            command = calibrate_command(args, server, measure, scorer, budget)
            log(f"calibrate: {server} {measure} {scorer or ''} {budget:g}")
            child = subprocess.Popen(command)
            try:
                status = child.wait()
            except KeyboardInterrupt:  # the child has the same Ctrl-C: it stops its server and says how to resume
                status = child.wait()
            except BaseException:  # e.g. `kill PID` of this driver (SystemExit): no orphaned calibrate or server
                if child.poll() is None:
                    # SIGTERM, which calibrate takes as Ctrl-C (it stops its server and exits 130):
                    # not SIGINT, which a driver started in the background (`cmd &` in a script)
                    # passes on ignored, and then nothing stops the child.
                    child.send_signal(signal.SIGTERM)
                    child.wait()
                raise
            if status == calibrate.EXIT_INTERRUPTED:
                log("calibrate: interrupted; rerun the same command to continue")
                sys.exit(calibrate.EXIT_INTERRUPTED)
            if status == calibrate.EXIT_INCOMPLETE:  # this sitting's minutes ran out; rerun continues
                log("calibrate: incomplete; rerun the same command to continue")
                return
            if status not in (calibrate.EXIT_RELAXED_CERTIFIED, calibrate.EXIT_ONLY_LOSSLESS):
                sys.exit(f"chat_meaning: calibrate failed with exit status {status}")


# -- the full stage --------------------------------------------------------------------------------


def calibrate_settings(args, server: tuple[str, int], measure: str, scorer: str | None,
                       budget: float) -> calibrate.CalibrateSettings:
    """The settings `selfjudge calibrate` runs this measurement with: its own parser on the
    command calibrate_command writes."""
    from selfjudge_vllm.cli import build_parser

    command = calibrate_command(args, server, measure, scorer, budget)
    return calibrate.settings_from_args(build_parser().parse_args(command[command.index("calibrate"):]))


parse_point = calibrate.parse_point_key  # (family, knob) of a calibrate point key


def acceptance_vs_lossless(store: RequestStore, key: str, ids: set[str]) -> tuple[float | None, float | None]:
    """(mean acceptance length, its ratio to lossless) on `ids`, both by calibrate.acceptance
    (vLLM's counters; None unless they cover every id)."""
    mine = calibrate.acceptance(store, key, ids)["mean_acceptance_length"]
    base = calibrate.acceptance(store, calibrate.LOSSLESS, ids)["mean_acceptance_length"]
    return mine, (mine / base if mine and base else None)


def counted_in_common(store: RequestStore, keys: list[str], ids: set[str]) -> set[str]:
    """The largest part of `ids` that every point's counters cover exactly (each point's
    counters segments inside it add up to all of it): shrunk until it holds, as a segment
    reaching outside the part no longer counts for it."""
    common = set(ids)
    while True:
        covered = set(common)
        for key in keys:
            covered -= store.uncounted(key, common)
        if covered == common:
            return common
        common = covered


def fastest_points(store: RequestStore, calibration_ids: list[str], head_tag: str = "") -> dict[str, str]:
    """Each rule family's point with the highest acceptance against lossless, every point of the
    family compared on the same prompts: the calibration prompts all of them were served on and
    all of their vLLM counters cover (counted_in_common: a sitting cut mid-segment leaves a
    point's last responses uncounted); the strictest on a tie. Lossless's counters are not
    needed: on the same prompts the longer mean acceptance length is the higher ratio to
    lossless. Where no prompt is counted for every point, the points counted on the fewest are
    left out, and said, and the others compared again. The judge's points are those of the
    head of `head_tag` (calibrate.store_head_tag): another head's are served by a server of its
    own."""
    families: dict[str, list[str]] = {}
    for key in store.requests:
        family, _ = parse_point(key)
        if family == "judge" and calibrate.point_head_tag(key) != head_tag:
            continue
        if family != calibrate.LOSSLESS and set(calibration_ids) & set(store.done(key)):
            families.setdefault(family, []).append(key)
    chosen = {}
    for family, keys in sorted(families.items()):
        keys = sorted(keys, key=lambda k: -parse_point(k)[1])  # strictest first: it wins a tie
        while keys:
            served = set(calibration_ids)
            for key in keys:
                served &= set(store.done(key))
            common = counted_in_common(store, keys, served)
            if common:
                lengths = {key: calibrate.acceptance(store, key, common)["mean_acceptance_length"] for key in keys}
                chosen[family] = max(keys, key=lambda k: lengths[k])  # max keeps the first (strictest) on a tie
                break
            counted = {key: len(counted_in_common(store, [key], set(calibration_ids) & set(store.done(key))))
                       for key in keys}
            fewest = [key for key in keys if counted[key] == min(counted.values())]
            log(f"fastest points: {', '.join(fewest)} left out of the {family} comparison: no calibration prompt is "
                f"counted for every point of the family, and they are counted on the fewest ({min(counted.values())})")
            keys = [key for key in keys if key not in fewest]
    return chosen


def read_plan(folder: Path) -> dict[str, str] | None:
    """The full stage's points ({family: key}) once chosen, else None."""
    path = folder / PLAN_FILE
    return json.loads(path.read_text())["points"] if path.is_file() else None


def full_plan(folder: Path, store: RequestStore, calibration_ids: list[str], head_tag: str) -> dict[str, str]:
    """fastest_points, chosen once and kept in FOLDER/plan.json: serving a point that stopped
    early on every prompt adds calibration prompts to the family's common ones, which could move
    the choice."""
    plan = read_plan(folder)
    if plan is None:
        plan = fastest_points(store, calibration_ids, head_tag)
        (folder / PLAN_FILE).write_text(json.dumps({"points": plan, "chosen": datetime.date.today().isoformat(),
                                                    "how": "per family, the highest mean acceptance length against "
                                                           "lossless on the calibration prompts every point of the "
                                                           "family was served on"},
                                                   indent=1) + "\n")
        log(f"full: each family's fastest point: {', '.join(plan.values()) or 'none'} ({folder / PLAN_FILE})")
    return plan


def unfinished_measurements(root: Path) -> list[str]:
    """The measurements of MEASUREMENTS without a complete calibrate report in OUT/<server>."""
    names = [measurement_name(m, s, b) for m, s, b in MEASUREMENTS]
    return [n for n in names if not (root / n / "report.json").is_file()
            or not json.loads((root / n / "report.json").read_text())["complete"]]


def _to_serve(store: RequestStore, key: str, items: list) -> int:
    """Requests measure_point still serves for `items`: those without a response, and those no
    counters segment covers (served again for the counters)."""
    done = store.done(key)
    return sum(i.id not in done for i in items) + len(store.uncounted(key, {i.id for i in items} & set(done)))


def serve_full(settings: calibrate.CalibrateSettings, llm: bool, max_minutes: float | None, measure=measure_point,
               embedder_factory=None) -> bool:
    """The full stage on one server (settings: calibrate's, with `out` its full folder): each
    family's fastest point on every prompt, then scored; True once everything is done, False
    when calibrate is not finished or --max-minutes ran out (rerun to continue). `measure` and
    `embedder_factory` stand in for serving and the embedding model in tests."""
    root = settings.out.parent
    unfinished = unfinished_measurements(root)
    if unfinished:
        log(f"full: {root.name}: calibrate has not finished {', '.join(unfinished)}; run the calibrate stage first")
        return False
    return serve_in_full(settings, lambda store, calibration_ids, head_tag: full_plan(
        settings.out, store, calibration_ids, head_tag), llm, max_minutes, measure, embedder_factory)


def serve_in_full(settings: calibrate.CalibrateSettings, plan_of, llm: bool, max_minutes: float | None,
                  measure=measure_point, embedder_factory=None, stage: str = "full") -> bool:
    """The points plan_of(store, calibration ids, the head's point-key tag) names ({family:
    key}) served on every prompt, calibration and test, by calibrate's server with `settings`
    into the folder settings.out on the server's store, then scored as calibrate scores; True
    once everything is done, False when --max-minutes ran out (rerun to continue)."""
    root = settings.out.parent
    rows = calibrate.without_label_prompts(settings, calibrate.prompt_rows(settings))
    bound = calibrate.bind_folder(settings)  # refused unless the store's responses were served with these settings
    requests = {r["id"]: request_text(r) for r in rows}
    items = {i.id: i for i in calibrate.render_items(rows, settings.target, settings.max_tokens)}
    calibration_ids, test_ids = calibrate.split_ids(list(items), settings.test_share, settings.seed)
    store = RequestStore(settings.out / "store")
    unpaired = [i for i in items if i not in store.done(calibrate.LOSSLESS)]
    if unpaired:  # every point is paired with the store's lossless responses, which calibrate serves
        log(f"{stage}: {root.name}: lossless has no response yet for {len(unpaired)} of the {len(items)} prompts; "
            "run the chat benchmark's calibrate stage first")
        return False
    plan = plan_of(store, calibration_ids, calibrate.store_head_tag(settings.out, bound["head_sha256"]))
    started = time.monotonic()

    def out_of_time() -> bool:
        return max_minutes is not None and (time.monotonic() - started) / 60 > max_minutes

    session = calibrate.Session(settings)
    # the LLM judge as calibrate's LLM measurements ask it (the target, over the same engine)
    scorer_session = calibrate.ScorerSession(dataclasses.replace(settings, measure="meaning_changes", scorer="llm"),
                                             session)
    try:
        # The calibration prompts first, then the test prompts, as calibrate serves lossless: a
        # counters segment mixing both would leave the calibration prompts' acceptance unknown.
        scopes = ([items[i] for i in calibration_ids], [items[i] for i in calibration_ids + test_ids])
        work = [(key, scope) for key in plan.values() for scope in scopes if needs_work(store, key, scope)]
        progress = None
        for key, scope in work:
            if out_of_time():
                log(f"{stage}: --max-minutes reached before {key}; rerun to continue")
                return False
            server = session.get()
            if progress is None:  # created once the server is up: start-up minutes are not serving time
                progress = Progress(sum(_to_serve(store, k, scopes[-1]) for k in plan.values()))
            family, knob = parse_point(key)
            log(f"{stage}: {key} on {len(scope)} prompts ({_to_serve(store, key, scope)} to serve)")
            if not measure(server, store, key, scope, request_options(family, knob), settings.concurrency, progress,
                           out_of_time):
                return False
        lossless = store.done(calibrate.LOSSLESS)
        pairs = [Pair(i, requests[i], lossless[i]["text"], store.done(key)[i]["text"])
                 for key in plan.values() for i in calibration_ids + test_ids]
        for label, scorer in scorer_settings().items():
            if scorer.scorer == "llm" and not llm:
                continue
            judge = MeaningJudge(scorer, settings.out / "store" / "scores.jsonl", llm_client=scorer_session.client,
                                 embedder_factory=embedder_factory)
            if not score_pairs(label, judge, pairs, out_of_time, stage):
                return False
    finally:
        scorer_session.close()
        session.close()
    log(f"{stage}: {root.name}: {', '.join(plan.values())} served on all {len(items)} prompts and scored"
        + ("" if llm else " (embedding only; --llm adds the LLM scorer and judged loss)"))
    return True


def score_pairs(label: str, judge: MeaningJudge, pairs: list[Pair], out_of_time, stage: str = "full") -> bool:
    """Every differing pair the judge lacks, SCORE_CHUNK at a time (each persisted as it is
    decided, as calibrate scores); False when --max-minutes ran out first."""
    todo = list({p.key: p for p in pairs if p.lossless != p.relaxed and p.key not in judge.scores}.values())
    if not todo:
        return True
    progress = Progress(len(todo), unit="pairs")
    log(f"{stage}: scoring {len(todo)} pairs with {label} ({judge.settings.score_key})")
    for start in range(0, len(todo), SCORE_CHUNK):
        if out_of_time():
            log(f"{stage}: --max-minutes reached while scoring with {label}; rerun to continue")
            return False
        chunk = todo[start:start + SCORE_CHUNK]
        judge.score(chunk)
        progress.tick(len(chunk))
        log(f"  {label}: {progress.line()}")
    return True


def run_full(args) -> None:
    for server in args.servers:
        measured = calibrated_head(OUT / server_name(server))
        if measured and measured != calibrate.file_sha256(args.head / "model.safetensors"):
            sys.exit(f"chat_meaning: full: --head {args.head} is not the head {server_name(server)}'s measurements "
                     f"were calibrated with (sha256 {measured[:12]}...): the full stage serves their judge points")
        first = calibrate_settings(args, server, *MEASUREMENTS[0])
        settings = dataclasses.replace(first, out=linked_folder(server, FULL), max_minutes=None)
        if not serve_full(settings, args.llm, args.max_minutes):
            log("full: not finished; rerun the same command to continue")
            return


def report(args) -> None:
    from benchmarks import chat_meaning_report

    chat_meaning_report.write(OUT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, help="`selfjudge testbed --model qwen-coder` folder (every stage but "
                        "the report)")
    parser.add_argument("--head", type=Path, default=BENCHMARK_HEAD,
                        help="the judge head (default: BENCHMARK_HEAD, whose points the report shows)")
    parser.add_argument("--stages", default="prompts,calibrate,full,report")
    parser.add_argument("--report-only", action="store_true",
                        help="only the report, from the committed files (nothing served or scored)")
    parser.add_argument("--servers", default="ngram:8",
                        type=lambda t: [(p, int(k)) for p, k in (s.split(":") for s in t.split(","))],
                        help="proposer:k, comma-separated (default ngram:8; then draft_model:8)")
    parser.add_argument("--prompts", type=int, default=420, help="benchmark prompts (default 420)")
    parser.add_argument("--max-minutes", type=float,
                        help="per calibrate run, and for the full stage: start no new segment after this")
    parser.add_argument("--llm", action="store_true", help="full: score the full points with the LLM scorer and "
                        "judged loss too (the embedding scorer always)")
    args = parser.parse_args(argv)
    stages = ["report"] if args.report_only else args.stages.split(",")
    if stages != ["report"]:
        if args.testbed is None:
            parser.error("--testbed is needed for every stage but the report")
        from selfjudge_vllm.server_process import exit_cleanly_on_sigterm

        exit_cleanly_on_sigterm()  # a killed run stops the server the full stage started
    OUT.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        {"prompts": write_prompts, "calibrate": run_calibrate, "full": run_full, "report": report}[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
