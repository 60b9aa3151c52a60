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
                family's grid, FLy at vLLM's default (0.3) and stricter
    report      the calibrate reports side by side (RESULTS/chat_meaning/summary.{json,md}):
                pre-declared measurements, none chosen among the others (each report lists
                the other certificates computed on its store)

Resumable like calibrate (a rerun continues; --max-minutes ends a sitting between segments):

    python benchmarks/chat_meaning.py --testbed testbed-qwen --stages prompts,calibrate --servers ngram:8 --max-minutes 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks import chat_tasks  # noqa: E402
from benchmarks.runner import speculative_config  # noqa: E402
from selfjudge_vllm import calibrate  # noqa: E402
from selfjudge_vllm.measurement import log  # noqa: E402

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
FLY_GRID = "fly=1.0,0.8,0.6,0.45,0.3,0.2"  # vLLM's default 0.3, stricter points first


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


def measurement_folder(server: tuple[str, int], measure: str, scorer: str | None, budget: float) -> Path:
    """OUT/<server>/<measure>[-<scorer>]-<budget>pct, its `store` a link to the server's shared
    store (the responses depend only on the server and the prompts, which every folder binds)."""
    root = OUT / f"{server[0]}-k{server[1]}"
    folder = root / f"{measure}{'-' + scorer if scorer else ''}-{100 * budget:g}pct"
    (root / "store").mkdir(parents=True, exist_ok=True)
    folder.mkdir(exist_ok=True)
    if not (folder / "store").exists():
        (folder / "store").symlink_to(Path("..") / "store", target_is_directory=True)
    return folder


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
            status = subprocess.run(command).returncode
            if status == calibrate.EXIT_INCOMPLETE:  # this sitting's minutes ran out; rerun continues
                log("calibrate: incomplete; rerun the same command to continue")
                return
            if status not in (calibrate.EXIT_RELAXED_CERTIFIED, calibrate.EXIT_ONLY_LOSSLESS):
                sys.exit(f"chat_meaning: calibrate failed with exit status {status}")


def summary(args) -> None:
    rows = []
    for folder in sorted(p for p in OUT.glob("*/*") if (p / "report.json").is_file()):
        report = json.loads((folder / "report.json").read_text())
        rows.append({"server": folder.parent.name, "folder": folder.name, "measure": report["measure"],
                     "scorer": report.get("scorer"),
                     "budget": report["budget"], "verdict": report["verdict"], "points": report["points"],
                     "lossless": report["lossless"]})
    (OUT / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    log(f"report: {len(rows)} calibrate reports in {OUT / 'summary.json'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, required=True, help="`selfjudge testbed --model qwen-coder` folder")
    parser.add_argument("--head", type=Path, default=RESULTS / "chat_judge" / "head")
    parser.add_argument("--stages", default="prompts,calibrate,report")
    parser.add_argument("--servers", default="ngram:8",
                        type=lambda t: [(p, int(k)) for p, k in (s.split(":") for s in t.split(","))],
                        help="proposer:k, comma-separated (default ngram:8; then draft_model:8)")
    parser.add_argument("--prompts", type=int, default=420, help="benchmark prompts (default 420)")
    parser.add_argument("--max-minutes", type=float, help="per calibrate run: start no new segment after this")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        {"prompts": write_prompts, "calibrate": run_calibrate, "report": summary}[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
