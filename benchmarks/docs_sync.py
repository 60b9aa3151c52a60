"""Keep the figures the docs quote equal to the committed results files.

    python -m benchmarks.docs_sync           # rewrite the generated blocks
    python -m benchmarks.docs_sync --check   # exit 1 and name the stale blocks (a test runs this)

Blocks, each between `<!-- NAME:begin ... -->` and `<!-- NAME:end -->`:
- docs/benchmarks.md `chat_tradeoff` and `tradeoff`: copies of the two benchmark reports;
- docs/benchmarks.md `meaning_validation`: a copy of the meaning scorers' validation report;
- docs/benchmarks.md `chat_meaning`: a copy of the chat benchmark's report;
- docs/benchmarks.md `chat_judge_scaling`: a copy of the paper's judge's scaling report;
- README.md `results`: the results table, rendered from benchmarks/results/chat_tradeoff.json;
- README.md `chat_results`: the chat table, rendered from benchmarks/results/chat_meaning/report.json.
A benchmark whose results file does not exist yet gets a block that says so (rendered from
the file's absence, so the check holds before the first run and fails once it is made).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import chat_meaning_report
from benchmarks.chat_tradeoff_report import BUDGETS, test_plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# The README's rows: (point key, how the README names it). Each server's FLy default and its
# certified points, and on the headline server each family's fastest confirmed point.
README_ROWS = (
    ("ngram-k8/judge-0.188512", "judge 0.188512 (its fastest confirmed point)"),
    ("ngram-k8/entropy-0.5", "`entropy` 0.5 (the loosest training-free point confirmed)"),
    ("ngram-k8/fly-0.3", "FLy, vLLM's defaults"),
    ("ngram-k8/fly-0.6", "FLy at threshold 0.6"),
    ("ngram-k8/top_alpha-0.9", "`top_alpha` 0.9"),
    ("ngram-k8/fly-1.0", "FLy at threshold 1.0 (stricter than its default)"),
    ("ngram-k8/entropy-3.0", "`entropy` 3.0"),
    ("ngram-k4/fly-0.3", "FLy, vLLM's defaults"),
    ("ngram-k4/top_alpha-0.9", "`top_alpha` 0.9"),
    ("ngram-k4/entropy-3.0", "`entropy` 3.0"),
    ("draft_model-k8/fly-0.3", "FLy, vLLM's defaults"),
    ("draft_model-k8/entropy-3.0", "`entropy` 3.0"),
    ("draft_model-k4/fly-0.3", "FLy, vLLM's defaults"),
    ("draft_model-k4/entropy-3.0", "`entropy` 3.0"),
)


def _certified_within(report: dict, key: str) -> str:
    """The tightest accuracy budget the certified table certifies the point at, with its bound."""
    for budget in sorted(BUDGETS):
        for entry in report["certified"]:
            if entry["measure"] != "accuracy" or entry["budget"] != budget:
                continue
            for cell in entry["families"].values():
                if cell["certified"] == key:
                    return f"{100 * budget:g}% (bound {100 * cell['upper_bound']:.2f}%)"
    return "no"


def _on_test_items(report: dict, key: str, planned: set[str], n_test: int) -> str:
    if key not in planned:
        return "-"
    row = next((r for r in report["test_points"] if r["key"] == key), None)
    if row is None or row.get("paired_n", 0) < n_test:
        return "not served yet"
    return (f"{row['acceptance_length_vs_lossless']:.2f}x; {row['changes']} ({100 * row['change_rate']:.2f}%); "
            f"{100 * row['accuracy_change']:+.2f}%")


def readme_results(report: dict) -> str:
    points = {p["key"]: p for p in report["points"]}
    planned = {key for keys in test_plan(report["certified"], report["points"]).values() for key in keys}
    n_test = max((r["n"] for r in report["test_points"] if r["method"] == "lossless"), default=0)
    held = report["setup"]["held_out_items"]
    lines = [f"| server | point | acceptance vs lossless | answers changed (of {points[README_ROWS[0][0]]['n']}) "
             f"| accuracy change on the {held} held-out items (95% bound) | certified within accuracy loss of "
             f"| on {n_test} test items: acceptance vs lossless; answers changed; accuracy change |",
             "|---|---|---:|---:|---:|---|---:|"]
    for key, label in README_ROWS:
        p = points[key]
        lines.append(f"| `{p['proposer']}` k={p['k']} | {label} | {p['acceptance_length_vs_lossless']:.2f}x "
                     f"| {p['changes']} | {100 * p['held_out_accuracy_change']:+.2f}% "
                     f"({100 * p['held_out_accuracy_change_lower95']:+.2f}%) | {_certified_within(report, key)} "
                     f"| {_on_test_items(report, key, planned, n_test)} |")
    return "\n".join(lines) + "\n"


CHAT_NOT_RUN = ("The chat benchmark has not been run yet (no `benchmarks/results/chat_meaning/{name}`): "
                "`python benchmarks/chat_meaning.py --testbed testbed-qwen` runs it, `--report-only` rebuilds its "
                "report.\n")


def _certified_by(server: dict, key: str) -> str:
    """The measurements that certified the point, e.g. "embedding 10%", or "no"."""
    return ", ".join(chat_meaning_report.short_name(c["scorer"], c["budget"])
                     + (f" ({chat_meaning_report.PENDING})" if chat_meaning_report.test_pending(c) else "")
                     for c in server["certified"]
                     if chat_meaning_report.certificate_stands(c) and any(r["key"] == key for r in c["certified"])
                     ) or "no"


def _chat_rows(server: dict) -> list[tuple[dict, str, str]]:
    """(row, how the README names the point, its prompts): each family's fastest point, on every
    prompt once the full stage served it there, else on the calibration prompts; then every other
    certified point, on the calibration prompts."""
    calibration = {r["key"]: r for r in server["points"]}
    out, seen = [], set()
    for row in server["full"]["points"]:
        if row["key"] == chat_meaning_report.LOSSLESS:
            continue
        name = f"{chat_meaning_report.point_name(row)} (the fastest {row['family']} point)"
        if row["complete"]:
            out.append((row, name, f"all {row['n']}"))
        else:
            own = calibration[row["key"]]
            out.append((own, name, f"calibration: {chat_meaning_report.served_cell(own)}"))
        seen.add(row["key"])
    for cell in server["certified"]:
        for certified in cell["certified"] if chat_meaning_report.certificate_stands(cell) else []:
            if certified["key"] not in seen:
                own = calibration[certified["key"]]
                out.append((own, chat_meaning_report.point_name(own),
                            f"calibration: {chat_meaning_report.served_cell(own)}"))
                seen.add(certified["key"])
    return sorted(out, key=lambda entry: -(entry[0]["acceptance_vs_lossless"] or 0.0))


def readme_chat_results(report: dict | None) -> str:
    """The README's chat table: per server, each family's fastest point and every certified one,
    with each scorer's figures and what certified it; then, per server, what is certified and
    which measurements have not run."""
    if report is None:
        return CHAT_NOT_RUN.format(name="report.json")
    titles = chat_meaning_report.SCORER_TITLES
    header = ["| server | point | acceptance vs lossless | prompts | "
              + " | ".join(f"{titles[label]} (95% bound)" for label in titles) + " | certified within |",
              "|---|---|---:|---|" + "---:|" * len(titles) + "---|"]
    rows, said = [], []
    for server in report["servers"]:
        for row, name, prompts in _chat_rows(server):
            rows.append(f"| {server['server']} | {name} | {chat_meaning_report.acceptance_cell(row)} | {prompts} | "
                        + " | ".join(chat_meaning_report.figures_cell(row["measures"][label]) for label in titles)
                        + f" | {_certified_by(server, row['key'])} |")
        certified = [c for c in server["certified"] if chat_meaning_report.certificate_stands(c) and c["certified"]]
        missing = [chat_meaning_report.short_name(c["scorer"], c["budget"]) for c in server["certified"]
                   if not chat_meaning_report.certificate_stands(c)]
        said.append(f"{server['server']}: " + (
            "; ".join(f"within {chat_meaning_report.short_name(c['scorer'], c['budget'])}: "
                      f"{chat_meaning_report.certified_points_cell(c)}"
                      + (f" ({chat_meaning_report.PENDING})" if chat_meaning_report.test_pending(c) else "")
                      for c in certified)
            if certified else "no relaxed point is certified by any measurement that finished")
            + (f" (not finished yet: {', '.join(missing)})" if missing else "") + ".")
    notes = [f"Note: {server['server']}: {note}." for server in report["servers"] for note in server["notes"]]
    lines = header + rows if rows else [
        "No point to show yet: the full stage has not chosen each family's fastest point and no relaxed point is "
        "certified (every point served so far: docs/benchmarks.md)."]
    return ("\n".join(lines) + "\n\nCertified (95% confidence, each measurement its own certificate): "
            + " ".join(said) + "\n" + "".join(f"\n{note}\n" for note in notes))


def chat_meaning_blocks(results: Path) -> dict[tuple[Path, str], str]:
    """The chat benchmark's two blocks, from its report, or saying it has not run yet."""
    folder = results / "chat_meaning"
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else None
    copy = (folder / "report.md").read_text() if (folder / "report.md").is_file() else CHAT_NOT_RUN.format(name="report.md")
    return {(ROOT / "docs" / "benchmarks.md", "chat_meaning"): copy,
            (ROOT / "README.md", "chat_results"): readme_chat_results(report)}


SCALING_NOT_RUN = ("The scaling benchmark has not trained its heads yet (no "
                   "`benchmarks/results/chat_judge_scaling/scaling.md`): `python benchmarks/chat_judge_scaling.py "
                   "--testbed testbed-qwen` runs it.\n")


def scaling_block(results: Path) -> dict[tuple[Path, str], str]:
    path = results / "chat_judge_scaling" / "scaling.md"
    return {(ROOT / "docs" / "benchmarks.md", "chat_judge_scaling"):
            path.read_text() if path.is_file() else SCALING_NOT_RUN}


def blocks() -> dict[tuple[Path, str], str]:
    """(file, block name) -> what the block must hold."""
    report = json.loads((RESULTS / "chat_tradeoff.json").read_text())
    return {(ROOT / "docs" / "benchmarks.md", "chat_tradeoff"): (RESULTS / "chat_tradeoff.md").read_text(),
            (ROOT / "docs" / "benchmarks.md", "tradeoff"): (RESULTS / "tradeoff.md").read_text(),
            (ROOT / "docs" / "benchmarks.md", "meaning_validation"):
                (RESULTS / "meaning_validation" / "report.md").read_text(),
            (ROOT / "README.md", "results"): readme_results(report),
            **chat_meaning_blocks(RESULTS), **scaling_block(RESULTS)}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:begin[^\n]*-->\n)(.*?)(<!-- {name}:end -->)", re.S)


def stale(files: dict[Path, str], wanted: dict[tuple[Path, str], str]) -> list[str]:
    out = []
    for (path, name), body in wanted.items():
        matches = list(_pattern(name).finditer(files[path]))
        if not matches:
            out.append(f"{path.name}: no {name} block")
        elif len(matches) > 1:  # as sync() refuses: every copy would have to be kept equal
            out.append(f"{path.name}: {len(matches)} {name} blocks, expected one")
        elif matches[0].group(2) != body:
            out.append(f"{path.name}: block {name} differs from what the results files give")
    return out


def sync(files: dict[Path, str], wanted: dict[tuple[Path, str], str]) -> dict[Path, str]:
    files = dict(files)
    for (path, name), body in wanted.items():
        files[path], count = _pattern(name).subn(lambda m, body=body: m.group(1) + body + m.group(3), files[path])
        if count != 1:
            raise SystemExit(f"{path}: expected one {name} block, found {count}")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say which blocks are stale (exit 1 if any)")
    args = parser.parse_args(argv)
    wanted = blocks()
    files = {path: path.read_text() for path, _ in wanted}
    if args.check:
        problems = stale(files, wanted)
        for line in problems:
            print(line)
        return 1 if problems else 0
    for path, text in sync(files, wanted).items():
        if text != files[path]:
            path.write_text(text)
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
