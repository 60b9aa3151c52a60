"""The chat benchmark's report (benchmarks/chat_meaning.py, stage `report` or --report-only):
RESULTS/chat_meaning/report.{json,md,png}, rebuilt from the committed files alone (nothing is
served or scored here).

Per server (OUT/<server>), read from its shared store (responses, vLLM's counters and the
persisted scores, store/scores.jsonl) and each measurement's calibrate report
(OUT/<server>/<measurement>/report.json):

    certified     per measurement (measure, scorer, budget): what calibrate certified, each
                  family's fastest certified point and its check on the test prompts
    points        every point in the store on the calibration prompts it was served on:
                  acceptance against lossless on the same prompts, texts changed, new loops,
                  and each scorer's figures where it scored the point
    full          each family's fastest point served on every prompt (the full stage): the
                  matched-acceptance comparison across families

Every figure has its definition elsewhere, used here as it is: the split is calibrate's
(split_ids, with the store's seed and share, of the prompt file less the label prompts calibrate
recorded dropping), acceptance calibrate's (vLLM's counters over the
same prompts as lossless), a meaning change or a judged loss meaning.MeaningJudge's decision
from the persisted score (a new repetition loop included, meaning.new_loop), each bound
certify.risk_upper_bound at level BOUND_LEVEL: a one-sided 95% upper bound for that point
alone, not a certificate (the certificates are calibrate's, in the certified table).

A scorer's figures on a point are on prompts where it decided every pair: all of the point's
prompts, or the first n a calibrate run with that scorer reported for the point (calibrate
scores a point's served prompts when it reads them; a later measurement may serve more).
Anything else is said to be partly scored, with no figure. Bounds are given only where the
point was served on every prompt of the section and the scorer decided all of them; a point
stopped early (or cut by --max-minutes) shows its n and carries no bound, as in calibrate's
reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.chat_meaning import (
    BENCHMARK_HEAD,
    FULL,
    MEASUREMENTS,
    acceptance_vs_lossless,
    calibrated_head,
    fastest_points,
    measurement_name,
    parse_point,
    read_plan,
    scorer_label,
    scorer_settings,
)
from benchmarks.report import METHOD_STYLE, OTHER_STYLE, legend_beside
from selfjudge_vllm import calibrate, certify
from selfjudge_vllm.files import file_sha256
from selfjudge_vllm.meaning import MeaningJudge, Pair, new_loop, request_text
from selfjudge_vllm.measurement import RequestStore, load_jsonl, log

BOUND_LEVEL = 0.05  # one-sided 95% upper bounds, each for its point alone
LOSSLESS = calibrate.LOSSLESS
# How the report names each scorer's figures.
SCORER_TITLES = {"embedding": "meaning changed, embedding", "llm": "meaning changed, LLM judge",
                 "judged_loss": "judged loss (lost - gained)"}


def server_folders(out: Path) -> list[Path]:
    """OUT/<server> folders whose store holds responses."""
    return sorted(p.parent.parent for p in out.glob("*/store/requests.jsonl"))


def prompt_splits(out: Path, store: RequestStore, reports) -> tuple[list[str], list[str]]:
    """(calibration, test) prompt ids as calibrate splits them: calibrate.split_ids, by the store's
    seed and share, of the prompt file's ids less the label prompts a calibrate report records
    dropping (whatever lossless was served on so far: a lossless run cut short leaves the split
    as it is, and lossless incomplete)."""
    settings = json.loads((store.folder / calibrate.STORE_SETTINGS_FILE).read_text())
    dropped = {i for *_, report in reports if report for i in report.get("label_prompts_dropped", [])}
    ids = [r["id"] for r in load_jsonl(out / "prompts.jsonl") if r["id"] not in dropped]
    return calibrate.split_ids(ids, settings["test_share"], settings["seed"])


def measurement_reports(root: Path) -> list[tuple[str, str, float, str, dict | None]]:
    """(measure, scorer label, budget, folder name, its calibrate report or None) per MEASUREMENTS entry."""
    out = []
    for measure, scorer, budget in MEASUREMENTS:
        name = measurement_name(measure, scorer, budget)
        path = root / name / "report.json"
        out.append((measure, scorer_label(measure, scorer), budget, name,
                    json.loads(path.read_text()) if path.is_file() else None))
    return out


def benchmark_head_tag(root: Path) -> str:
    """The tag (calibrate.store_head_tag) of the judge points of the head the measurements were
    calibrated with (BENCHMARK_HEAD before any was begun); the other judge points on the store
    are other heads' (the first chat head's, chat_judge_scaling's)."""
    return calibrate.store_head_tag(root, calibrated_head(root) or file_sha256(BENCHMARK_HEAD / "model.safetensors"))


def short_name(label: str, budget: float) -> str:
    """A measurement in a few words, e.g. "embedding 5%"."""
    return f"{label} {100 * budget:g}%"


def calibrate_marks(reports) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
    """From the calibrate reports: per point key, the measurements that stopped it early or cut
    it (--max-minutes); and per scorer label and key, the most calibration prompts a run with
    that scorer reported the point on (the prompts it had scored the point on)."""
    marks: dict[str, dict] = {}
    reported_n: dict[str, dict[str, int]] = {}
    for _, label, budget, _, report in reports:
        for row in (report or {}).get("points", []):
            mark = marks.setdefault(row["key"], {"stopped_early_by": [], "partial_in": []})
            if row["stopped_early"]:
                mark["stopped_early_by"].append(short_name(label, budget))
            if row.get("partial"):
                mark["partial_in"].append(short_name(label, budget))
            by_key = reported_n.setdefault(label, {})
            by_key[row["key"]] = max(by_key.get(row["key"], 0), row["n"])
    return marks, reported_n


def _decided(judge: MeaningJudge, pair: Pair) -> bool:
    return pair.lossless == pair.relaxed or pair.key in judge.scores  # identical texts need no scorer


def scorer_figures(judge: MeaningJudge, pairs: list[Pair], reported_n: int, bounded: bool) -> dict:
    """The judge's figures on the point's pairs (in the order served): on all of them when it
    decided each, else on the first `reported_n` when it decided those; a bound only on all of
    them when `bounded`. {"scored": "none"|"partly", ...} when it has no figures to give."""
    differing = [p for p in pairs if p.lossless != p.relaxed]
    scored = sum(p.key in judge.scores for p in differing)
    if all(_decided(judge, p) for p in pairs):
        on = pairs
    elif reported_n and all(_decided(judge, p) for p in pairs[:reported_n]):
        on = pairs[:reported_n]
    else:
        return {"scored": "partly" if scored else "none", "scored_pairs": scored, "differing_pairs": len(differing)}
    bounded = bounded and len(on) == len(pairs)
    figures = {"scored": "all" if len(on) == len(pairs) else "first", "n": len(on)}
    if judge.settings.measure == "judged_loss":
        verdicts = [judge.verdict(p) for p in on]
        lost, gained = verdicts.count("lost"), verdicts.count("gained")
        return {**figures, "lost": lost, "gained": gained, "rate": (lost - gained) / len(on),
                "upper95": certify.risk_upper_bound("judged_loss", len(on), BOUND_LEVEL, lost=lost, gained=gained)
                if bounded else None}
    changes = sum(judge.changed(p) for p in on)
    return {**figures, "changes": changes, "rate": changes / len(on),
            "upper95": certify.risk_upper_bound("meaning_changes", len(on), BOUND_LEVEL, changes=changes)
            if bounded else None}


def point_row(store: RequestStore, key: str, scope: list[str], requests: dict[str, str],
              judges: dict[str, MeaningJudge], marks: dict[str, dict], reported_n: dict[str, dict[str, int]]) -> dict:
    """One point on the prompts of `scope` (in the order served) it and lossless were served on."""
    lossless, mine = store.done(LOSSLESS), store.done(key)
    ids = [i for i in scope if i in mine and i in lossless]
    complete = bool(ids) and len(ids) == len(scope)
    family, knob = parse_point(key)
    length, ratio = acceptance_vs_lossless(store, key, set(ids))
    row = {"key": key, "family": family, "knob": knob, "n": len(ids), "of": len(scope), "complete": complete,
           **marks.get(key, {"stopped_early_by": [], "partial_in": []}),
           "mean_acceptance_length": length, "acceptance_vs_lossless": ratio}
    if key == LOSSLESS or not ids:
        return row
    pairs = [Pair(i, requests.get(i, ""), lossless[i]["text"], mine[i]["text"]) for i in ids]
    texts = sum(p.lossless != p.relaxed for p in pairs)
    row["text_changes"] = {"changes": texts, "rate": texts / len(pairs),
                           "upper95": certify.risk_upper_bound("text_changes", len(pairs), BOUND_LEVEL, changes=texts)
                           if complete else None}
    row["loops"] = sum(p.lossless != p.relaxed and new_loop(p.lossless, p.relaxed) is not None for p in pairs)
    row["measures"] = {label: scorer_figures(judge, pairs, reported_n.get(label, {}).get(key, 0), complete)
                       for label, judge in judges.items()}
    for figures in row["measures"].values():
        if figures["scored"] == "first":  # the acceptance on the same first n prompts as the rate
            figures["acceptance_vs_lossless"] = acceptance_vs_lossless(store, key, set(ids[:figures["n"]]))[1]
    return row


def certified_cell(measure: str, label: str, budget: float, name: str, report: dict | None) -> dict:
    """What one measurement's calibrate report certified: every certified point, each family's
    fastest (the one calibrate served on the test prompts) with its test figures."""
    cell = {"measurement": name, "measure": measure, "scorer": label, "budget": budget, "ran": report is not None}
    if report is None:
        return cell
    base = report["lossless"]["mean_acceptance_length"]
    certified = [{k: row.get(k) for k in ("key", "family", "knob", "n", "changes", "lost", "gained", "observed_risk",
                                          "upper_bound", "p_value", "mean_acceptance_length", "test")}
                 | {"acceptance_vs_lossless": row["mean_acceptance_length"] / base
                    if base and row["mean_acceptance_length"] else None}
                 for row in report["points"] if row["certified"]]
    return {**cell, "complete": report["complete"], "exploratory": bool(report.get("exploratory")),
            "verdict": report["verdict"], "calibration_prompts": report["calibration_prompts"],
            "test_prompts": report["test_prompts"], "level_per_family": report["level_per_family"],
            "families": len(report["families"]),
            "scorer_settings": report.get("scorer"), "certified": certified,
            "best": report["certified"] and report["certified"]["key"]}


def server_report(out: Path, root: Path, requests: dict[str, str]) -> dict:
    store = RequestStore(root / "store")
    reports = measurement_reports(root)
    calibration_ids, test_ids = prompt_splits(out, store, reports)
    marks, reported_n = calibrate_marks(reports)
    judges = {label: MeaningJudge(settings, store.folder / "scores.jsonl") for label, settings in scorer_settings().items()}
    head_tag = benchmark_head_tag(root)
    keys = sorted((k for k in store.requests if parse_point(k)[0] != "judge" or calibrate.point_head_tag(k) == head_tag),
                  key=lambda k: (k != LOSSLESS, parse_point(k)[0], -(parse_point(k)[1] or 0)))
    points = [point_row(store, k, calibration_ids, requests, judges, marks, reported_n) for k in keys]
    plan = read_plan(root / FULL)
    full_keys = [LOSSLESS, *(plan or fastest_points(store, calibration_ids, head_tag)).values()]
    full = [point_row(store, k, calibration_ids + test_ids, requests, judges, marks, {}) for k in full_keys]
    notes = [f"{name}: its calibrate report counts {r['calibration_prompts']} calibration prompts, the store's split "
             f"{len(calibration_ids)}" for _, _, _, name, r in reports
             if r and r["calibration_prompts"] != len(calibration_ids)]
    benchmark_scorers = {label: settings.as_dict() for label, settings in scorer_settings().items()}
    notes += [f"{name} was calibrated with the scorer {json.dumps(r.get('scorer'))}, not the benchmark's "
              f"{json.dumps(benchmark_scorers[label])} that this report's figures use"
              for _, label, _, name, r in reports if r and r.get("scorer") != benchmark_scorers[label]]
    return {"server": root.name, "prompts": len(requests), "lossless_served": len(store.done(LOSSLESS)),
            "calibration_prompts": len(calibration_ids), "test_prompts": len(test_ids),
            # begun: a calibrate run bound the folder (one interrupted before its first report has no report)
            "certified": [certified_cell(*entry) | {"begun": (root / entry[3] / "settings.json").is_file()}
                          for entry in reports], "points": points,
            "full": {"planned": plan is not None, "points": full}, "notes": notes}


def build(out: Path) -> dict | None:
    """The report of every server under OUT, or None when nothing was served yet."""
    folders = server_folders(out)
    if not folders:
        return None
    requests = {r["id"]: request_text(r) for r in load_jsonl(out / "prompts.jsonl")}
    return {"benchmark": "chat_meaning", "bound_level": BOUND_LEVEL,
            "scorers": {label: s.as_dict() for label, s in scorer_settings().items()},
            "measurements": [measurement_name(*m) for m in MEASUREMENTS],
            "servers": [server_report(out, root, requests) for root in folders],
            "command": "python benchmarks/chat_meaning.py --report-only"}


def write(out: Path) -> dict | None:
    report = build(out)
    if report is None:
        log(f"report: nothing served yet under {out}; no report written")
        return None
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    try:
        plot(report, out / "report.png")
    except ImportError:  # matplotlib is in the `calibrate` extra
        log("report: matplotlib not installed; no plot")
    log(f"report: {out / 'report.md'}")
    return report


# -- markdown ---------------------------------------------------------------------------------------


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def point_name(row: dict) -> str:
    return "lossless" if row["family"] == LOSSLESS else f"{row['family']} {row['knob']:g}"


def served_cell(row: dict) -> str:
    """n, and why it is short of the section's prompts when it is."""
    if row["complete"]:
        return str(row["n"])
    why = (f"stopped early by {', '.join(row['stopped_early_by'])}" if row["stopped_early_by"] else
           f"cut by --max-minutes in {', '.join(row['partial_in'])}" if row["partial_in"] else "not served on all")
    return f"{row['n']} of {row['of']} ({why})"


def acceptance_cell(row: dict) -> str:
    if row["acceptance_vs_lossless"] is None:
        return "n/a"
    return f"{row['acceptance_vs_lossless']:.3f}x ({row['mean_acceptance_length']:.2f})"


def figures_cell(figures: dict) -> str:
    """A scorer's figures: count, rate, its 95% bound, and on how many prompts when not all."""
    if figures["scored"] == "none":
        return "not scored"
    if figures["scored"] == "partly":
        return f"partly scored ({figures['scored_pairs']} of {figures['differing_pairs']} differing pairs)"
    count = f"{figures['lost']}-{figures['gained']}" if "lost" in figures else str(figures["changes"])
    there = figures.get("acceptance_vs_lossless")
    on = "" if figures["scored"] == "all" else (
        f", first {figures['n']} prompts ({'n/a' if there is None else f'{there:.3f}x'} acceptance vs lossless there)")
    bound = "" if figures["upper95"] is None else f" (<= {pct(figures['upper95'])})"
    return f"{count}: {pct(figures['rate'])}{bound}{on}"


def scored_by(row: dict) -> str:
    """Which scorers the figures come from, and on how much of the point."""
    if not row["text_changes"]["changes"]:
        return "no scorer needed (no text changed)"
    said = []
    for label, figures in row["measures"].items():
        if figures["scored"] == "all":
            said.append(label)
        elif figures["scored"] == "first":
            said.append(f"{label} (first {figures['n']})")
        elif figures["scored"] == "partly":
            said.append(f"{label} (partly)")
    return ", ".join(said) or "none"


def points_table(rows: list[dict]) -> list[str]:
    labels = list(SCORER_TITLES)
    lines = ["| point | prompts | acceptance vs lossless (length) | texts changed | new loops | "
             + " | ".join(f"{SCORER_TITLES[label]} (95% bound)" for label in labels) + " | scored by |",
             "|---|---|---:|---:|---:|" + "---:|" * len(labels) + "---|"]
    for row in rows:
        if row["family"] == LOSSLESS:
            lines.append(f"| lossless | {served_cell(row)} | {acceptance_cell(row)} | - | - | "
                         + " | ".join("-" for _ in labels) + " | - |")
            continue
        if "measures" not in row:
            lines.append(f"| {point_name(row)} | {served_cell(row)} | n/a | - | - | " + " | ".join("-" for _ in labels)
                         + " | - |")
            continue
        texts = row["text_changes"]
        lines.append(f"| {point_name(row)} | {served_cell(row)} | {acceptance_cell(row)} "
                     f"| {texts['changes']} ({pct(texts['rate'])}) | {row['loops']} | "
                     + " | ".join(figures_cell(row["measures"][label]) for label in labels)
                     + f" | {scored_by(row)} |")
    return lines


def certified_points_cell(cell: dict) -> str:
    """Each family's fastest certified point (acceptance vs lossless; calibrate's bound, at its
    level per family), the stricter certified points of the family after it."""
    by_family: dict[str, list[dict]] = {}
    for row in cell["certified"]:
        by_family.setdefault(row["family"], []).append(row)
    parts = []
    for family, rows in by_family.items():
        fastest = max(rows, key=lambda r: r["mean_acceptance_length"] or 0.0)
        others = [f"{r['knob']:g}" for r in rows if r is not fastest]
        ratio = "n/a" if fastest["acceptance_vs_lossless"] is None else f"{fastest['acceptance_vs_lossless']:.3f}x"
        parts.append(f"{family} {fastest['knob']:g} ({ratio}; bound {pct(fastest['upper_bound'])})"
                     + (f", also {', '.join(others)}" if others else ""))
    if not parts:
        return "only lossless"
    return "; ".join(parts) + f" ({bound_level(cell)})"


def bound_level(cell: dict) -> str:
    """What calibrate's bounds are: at its level per family (delta over the families), not 95%."""
    return (f"calibrate's bounds at {100 * (1 - cell['level_per_family']):g}%, Bonferroni over {cell['families']} "
            f"{'family' if cell['families'] == 1 else 'families'}")


def test_cell(cell: dict) -> str:
    """Each family's fastest certified point on the test prompts, as calibrate measured it."""
    parts = []
    for row in cell["certified"]:
        test = row.get("test")
        if not test:
            continue
        count = f"{test['lost']}-{test['gained']}" if cell["measure"] == "judged_loss" else str(test["changes"])
        parts.append(f"{row['family']} {row['knob']:g}: {count} of {test['n']}, {pct(test['observed_risk'])}")
    return "; ".join(parts) or "-"


def certificate_stands(cell: dict) -> bool:
    """Whether the measurement's certificate is final: its calibrate run finished, or it finished
    the calibration part and certified (calibrate certifies then; --max-minutes may still have cut
    its test part)."""
    return cell["ran"] and not cell["exploratory"] and (cell["complete"] or bool(cell["certified"]))


def test_pending(cell: dict) -> bool:
    """Certified, the calibrate run's check on the test prompts not finished yet."""
    return certificate_stands(cell) and not cell["complete"]


PENDING = "test check pending"


def certified_table(cells: list[dict]) -> list[str]:
    lines = ["| measurement | budget | result | certified points (acceptance vs lossless; calibrate's bound) "
             "| on the test prompts (the calibrate run's check) |", "|---|---:|---|---|---|"]
    for cell in cells:
        title = SCORER_TITLES[cell["scorer"]]
        if not cell["ran"]:
            status = ("begun, interrupted before its first report (rerun calibrate to continue)"
                      if cell.get("begun") else "not run yet")
            lines.append(f"| {title} | {100 * cell['budget']:g}% | {status} | - | - |")
            continue
        result = ("exploratory (nothing certified)" if cell["exploratory"] else
                  f"relaxed point certified ({PENDING}: its test part was cut, rerun calibrate to finish it)"
                  if test_pending(cell) else
                  "incomplete (nothing certified yet)" if not cell["complete"] else
                  "relaxed point certified" if cell["certified"] else "only lossless certified")
        lines.append(f"| {title} | {100 * cell['budget']:g}% | {result} | "
                     f"{certified_points_cell(cell) if certificate_stands(cell) else '-'} | "
                     f"{test_cell(cell) if not test_pending(cell) else PENDING} |")
    return lines


def markdown(report: dict) -> str:
    scorers = report["scorers"]
    lines = [
        "# The chat benchmark: relaxed acceptance on ShareGPT prompts, certified on meaning", "",
        "Each server's prompts are split as `selfjudge calibrate` splits them (calibration and test); every point is "
        "paired with the same server's lossless responses to the same prompts. Scorers: embedding (cosine of "
        f"{scorers['embedding']['model']} below {scorers['embedding']['threshold']:g}), LLM judge ("
        f"{scorers['llm']['model']}, {scorers['llm']['prompt_version']}, P(same) below "
        f"{scorers['llm']['threshold']:g}) and judged loss ({scorers['judged_loss']['model']}, "
        f"{scorers['judged_loss']['prompt_version']}: lost - gained); a new repetition loop in the relaxed response "
        "counts as changed (lost). The figures are the scorers' verdicts, not a person's "
        "(docs/calibrate.md, \"Choosing a measure\").", "",
        f"Bounds (<=): one-sided {100 * (1 - report['bound_level']):g}% upper bounds (exact binomial for shares, the "
        "net-loss test's for judged loss: `certify.risk_upper_bound`), each for its point alone: not simultaneous "
        "over the points, not after picking one, and not a certificate (the certificates are calibrate's, below). "
        "A point stopped early, or cut by --max-minutes, shows its n and no bound. Each bound holds for its point "
        "unconditionally, not given that the point was served in full: calibrate serves a point in full only when "
        "its early changes were few, so among the bounds shown (the points served in full) coverage is below 95%. "
        "And the rate of a point stopped early overstates its true rate: it was stopped because its changes so far "
        "were high. A scorer's figures cover every "
        "prompt of the point unless said (\"first n\": the prompts a calibrate run with that scorer read; \"partly "
        "scored\": no figure). Acceptance: mean acceptance length against lossless on the same prompts (vLLM's "
        "counters; in brackets, tokens per step).", ""]
    for server in report["servers"]:
        lines += [f"## {server['server']}", "",
                  f"{server['prompts']} prompts, lossless served on {server['lossless_served']}: "
                  f"{server['calibration_prompts']} calibration and {server['test_prompts']} test prompts"
                  + ("" if server["lossless_served"] >= server["calibration_prompts"] + server["test_prompts"] else
                     " (lossless incomplete: not served on every prompt yet; each point's figures are on the "
                     "prompts lossless was served on)") + ".", ""]
        lines += [f"Note: {note}." for note in server["notes"]] + ([""] if server["notes"] else [])
        lines += ["### What calibrate certified", "",
                  "Per measurement, its own certificate at 95% confidence (each report lists the others computed on "
                  "the same responses; none is chosen among them). The test prompts' check is calibrate's: each "
                  "family's fastest certified point served on the test prompts.", ""]
        lines += certified_table(server["certified"]) + [""]
        lines += [f"### Every served point on the {server['calibration_prompts']} calibration prompts", ""]
        lines += points_table(server["points"]) + [""]
        full = server["full"]
        lines += [f"### Each family's fastest point on all {server['calibration_prompts'] + server['test_prompts']} "
                  "prompts (the matched-acceptance comparison)", "",
                  ("The fastest point of each family (highest acceptance against lossless, the family's points "
                   "compared on the calibration prompts all of them were served on), served on every prompt by the "
                   "full stage."
                   if full["planned"] else "The full stage has not run yet: the points it will serve, on the prompts "
                   "served so far."), ""]
        lines += points_table(sorted(full["points"], key=lambda r: r["acceptance_vs_lossless"] or 0.0)) + [""]
    lines += [f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


# -- the plot ---------------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    """Acceptance against lossless vs meaning-change rate per family, one panel per server, on
    the calibration prompts: filled markers by the embedding scorer, hollow by the LLM judge,
    a line to each 95% bound; a dashed ring around a point stopped early or a scorer's "first n"
    figures (the acceptance then on those same n prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = report["servers"]
    fig, axes = plt.subplots(1, len(servers), figsize=(7.5 * len(servers) + 1.5, 4.8), squeeze=False)
    families = []
    for ax, server in zip(axes[0], servers):
        ax.scatter([0], [1.0], color=METHOD_STYLE[LOSSLESS][0], marker=METHOD_STYLE[LOSSLESS][1], zorder=3)
        for row in server["points"]:
            if row["family"] == LOSSLESS or "measures" not in row or row["acceptance_vs_lossless"] is None:
                continue
            color, marker = METHOD_STYLE.get(row["family"], OTHER_STYLE)
            families += [row["family"]] if row["family"] not in families else []
            for label, filled in (("embedding", True), ("llm", False)):
                figures = row["measures"][label]
                if figures["scored"] not in ("all", "first"):
                    continue
                first = figures["scored"] == "first"
                y = figures.get("acceptance_vs_lossless") if first else row["acceptance_vs_lossless"]
                if y is None:
                    continue
                x = 100 * figures["rate"]
                if figures["upper95"] is not None:
                    ax.plot([x, 100 * figures["upper95"]], [y, y], color=color, linewidth=0.8, alpha=0.6)
                ax.scatter([x], [y], color=color if filled else "white", edgecolors=color, marker=marker, zorder=3)
                if first or not row["complete"]:  # on fewer prompts; a stopped point's rate is biased up
                    ax.scatter([x], [y], s=160, facecolors="none", edgecolors=color, linestyles="--", marker="o",
                               zorder=2)
        ax.set_title(f"{server['server']}: {server['calibration_prompts']} calibration prompts")
        ax.set_xlabel("meaning changed vs lossless (% of prompts)")
        ax.set_ylabel("mean acceptance length vs lossless")
        ax.grid(alpha=0.3)
    legend_beside(fig, [LOSSLESS, *families], "filled: embedding\nhollow: LLM judge\nline: to the 95% bound\n"
                  "dashed ring: stopped early or\nfirst n prompts (rate and\nacceptance on those)")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend beside the panels included
    plt.close(fig)
