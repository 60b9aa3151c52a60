"""Per-point statistics, matched-quality table, CSV, plots and Markdown of
benchmarks/chat_tradeoff.py, computed from its store (requests.jsonl, segments.jsonl) alone.

Against the same server's lossless run, on the items both have, item by item:
  text differs     items whose response text differs at all (the answer may still agree)
  answer changes   items whose final answer (GSM8K) or pass/fail result (HumanEval) differs
                   from lossless, in either direction; rate with its exact one-sided 95% upper
                   bound (Clopper-Pearson)
  accuracy change  relaxed minus lossless accuracy, with the exact McNemar p-value
A point is within budget B when that upper bound is <= B. The matched tables count only the
held-out items: confirmation items outside the screening subset whose results chose the
points (held_out_rows).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import chat_tasks, tasks
from benchmarks.report import METHOD_STYLE, OTHER_STYLE, legend_beside, write_files
from benchmarks.runner import parse_key, point_key
from selfjudge_vllm.calibrate import CachedOutcomes
from selfjudge_vllm.measurement import point_summary

BUDGETS = (0.01, 0.02, 0.05)
# Families the matched tables compare; `fly` is vLLM's own FLy verifier (made by the plugin's
# rule), the training-free baseline users have without this plugin.
METHOD_FAMILIES = {"judge": ("judge",), "training_free": ("top_alpha", "entropy"), "fly": ("fly",)}
FAMILY_LABELS = {"judge": "judge", "training_free": "training-free", "fly": "FLy"}
METHOD_ORDER = {"alone": -1, "lossless": 0, "judge": 1, "judge_hidden": 2, "judge_both": 3, "top_alpha": 4, "entropy": 5,
                "fly": 6, "fly_w2": 7, "fly_w4": 8}


class Outcomes(CachedOutcomes):
    """Final answer / pass result per (item, text) of the benchmark's items, computed once."""

    def __init__(self, items):
        self.items = {i.id: i for i in items}
        super().__init__(lambda item_id, text: chat_tasks.outcome(self.items[item_id], text))


def point_rows(store, outcomes: Outcomes, only_ids: set[str] | None = None, server=None) -> list[dict]:
    """One row per point (of `server`, or all), restricted to `only_ids` when given."""
    rows = []
    def order(key):
        proposer, k, method, knob = parse_key(key)
        return (proposer, k), METHOD_ORDER.get(method, len(METHOD_ORDER)), -(knob or 0)

    keys = sorted(store.requests, key=order)
    for key in keys:
        proposer, k, method, knob = parse_key(key)
        if server is not None and (proposer, k) != tuple(server):
            continue
        done = {i: r for i, r in store.done(key).items() if i in outcomes.items and (only_ids is None or i in only_ids)}
        if not done:
            continue
        results = {i: outcomes(i, r["text"]) for i, r in done.items()}
        row = {"key": key, "proposer": proposer, "k": k, "method": method, "knob": knob, "n": len(done),
               "stopped_early": store.stopped_early(key), **point_summary(store, key, set(done))}
        if row["timed_items"] < len(done):
            # A sitting ended inside this point: its counters cover only some items (a subset
            # with other acceptance than the whole), so no acceptance or speed figure is given.
            row.update(mean_acceptance_length=None, acceptance_rate=None, tokens_per_s=None)
        for family in chat_tasks.FAMILIES:
            ids = [i for i in done if outcomes.items[i].family == family]
            row[f"{family}_n"] = len(ids)
            row[f"{family}_accuracy"] = sum(results[i]["correct"] for i in ids) / len(ids) if ids else None
        row["accuracy"] = sum(r["correct"] for r in results.values()) / len(results)
        row["_results"], row["_texts"] = results, {i: r["text"] for i, r in done.items()}
        rows.append(row)
    _compare_with_lossless(rows, store)
    return rows


def changed_items(results: dict, base_results: dict) -> list[str]:
    """Items of both whose final answer (GSM8K) or pass result (HumanEval) differs: the
    answer changes every budget counts."""
    return [i for i in results if i in base_results and results[i]["answer"] != base_results[i]["answer"]]


def beyond_every_budget(store, outcomes: Outcomes, key: str, lossless_key: str, n_total: int) -> str | None:
    """Why `key` can no longer be within any budget once measured on `n_total` items (None
    while it still can): the answers it has already changed against lossless, which more
    items can only add to, bound its change rate above the loosest budget."""
    mine, base = store.done(key), store.done(lossless_key)
    common = [i for i in mine if i in base and i in outcomes.items]
    changes = len(changed_items({i: outcomes(i, mine[i]["text"]) for i in common},
                                {i: outcomes(i, base[i]["text"]) for i in common}))
    bound = tasks.change_rate_upper_bound(changes, n_total)
    if bound <= max(BUDGETS):
        return None
    return (f"{changes} answers changed in {len(common)} items: on {n_total} the 95% bound is at least "
            f"{100 * bound:.2f}% > {100 * max(BUDGETS):g}%")


def _compare_with_lossless(rows: list[dict], store) -> None:
    lossless = {(r["proposer"], r["k"]): r for r in rows if r["method"] == "lossless"}
    reference = next((r for r in rows if r["method"] == "alone"), None)
    for row in rows:
        base = lossless.get((row["proposer"], row["k"]))
        if row["method"] == "lossless" and reference is not None:
            common = [i for i in row["_texts"] if i in reference["_texts"]]
            row["identical_to_target_alone"] = sum(row["_texts"][i] == reference["_texts"][i] for i in common)
            row["compared_with_target_alone"] = len(common)
        if base is None or row["method"] in ("lossless", "alone"):
            continue
        common = [i for i in row["_results"] if i in base["_results"]]
        mine, theirs = row["_results"], base["_results"]
        changed = changed_items({i: mine[i] for i in common}, theirs)
        # Responses whose text differs at all: how often a relaxed response keeps its answer.
        text_changed = sum(row["_texts"][i] != base["_texts"][i] for i in common)
        gained = sum(mine[i]["correct"] and not theirs[i]["correct"] for i in common)
        lost = sum(theirs[i]["correct"] and not mine[i]["correct"] for i in common)
        n = len(common)
        # Acceptance and speed ratios against lossless on the same items: a point stopped early
        # (or still being served) has fewer items than lossless, and items differ in acceptance.
        base_paired = point_summary(store, base["key"], set(common))
        if base_paired["timed_items"] < n:  # lossless's counter segments do not fit these items
            base_paired.update(mean_acceptance_length=None, tokens_per_s=None)
        row.update({
            "paired_n": n, "changes": len(changed), "changed_ids": changed, "text_changes": text_changed,
            "answer_kept_share_of_changed_texts": 1 - len(changed) / text_changed if text_changed else None,
            "change_rate": len(changed) / n if n else None,
            "change_upper95": tasks.change_rate_upper_bound(len(changed), n),
            "gained": gained, "lost": lost, "accuracy_change": (gained - lost) / n if n else None,
            "accuracy_change_lower95": tasks.accuracy_change_lower_bound(gained, lost, n),
            "mcnemar_p": tasks.mcnemar_exact_p(gained, lost),
            "lossless_acceptance_length_on_same_items": base_paired["mean_acceptance_length"],
            "acceptance_length_vs_lossless": _ratio(row["mean_acceptance_length"], base_paired["mean_acceptance_length"]),
            "tokens_per_s_vs_lossless": _ratio(row["tokens_per_s"], base_paired["tokens_per_s"]),
            "tokens_per_s_batch1_vs_lossless": _ratio(row["tokens_per_s_batch1"], base["tokens_per_s_batch1"]),
        })
        for budget in BUDGETS:
            row[f"within_{budget:g}"] = row["change_upper95"] <= budget
            row[f"accuracy_within_{budget:g}"] = row["accuracy_change_lower95"] >= -budget


def _ratio(a, b):
    return a / b if a and b else None


def headlines(rows: list[dict]) -> list[dict]:
    """Per server: lossless acceptance length, and for the judge and the best training-free
    rule the highest acceptance length within each answer-change budget ("budgets") and within
    each accuracy-loss budget ("accuracy_budgets": the SelfJudge paper's measure, in which
    gained and lost items cancel)."""
    out = []
    for server in sorted({(r["proposer"], r["k"]) for r in rows if r["method"] == "lossless"}):
        group = [r for r in rows if (r["proposer"], r["k"]) == server]
        lossless = next(r for r in group if r["method"] == "lossless")
        entry = {"proposer": server[0], "k": server[1], "lossless_acceptance_length": lossless["mean_acceptance_length"],
                 "lossless_n": lossless["n"], "lossless_accuracy": lossless["accuracy"],
                 "lossless_tokens_per_s": lossless["tokens_per_s"],
                 "lossless_tokens_per_s_batch1": lossless["tokens_per_s_batch1"]}
        for table, prefix in (("budgets", "within"), ("accuracy_budgets", "accuracy_within")):
            entry[table] = {
                f"{budget:g}": {family: _summary(_best(group, methods, f"{prefix}_{budget:g}", lossless))
                                for family, methods in METHOD_FAMILIES.items()}
                for budget in BUDGETS}
        out.append(entry)
    return out


def _best(group: list[dict], methods, within: str, lossless: dict) -> dict | None:
    """The point of `methods` with the highest acceptance length among those `within` a budget,
    compared as a ratio to lossless on the point's own items (points served on the screening
    subset and on the whole set differ in their items), or to lossless overall where no paired
    ratio exists."""
    def gain(r):
        if r["acceptance_length_vs_lossless"]:
            return r["acceptance_length_vs_lossless"]
        base = lossless.get("mean_acceptance_length")
        return r["mean_acceptance_length"] / base if base else 0.0  # no lossless figure: ranked last

    return max((r for r in group if r["method"] in methods and r.get(within) and r["mean_acceptance_length"]),
               key=gain, default=None)


def _summary(row):
    if row is None:
        return None
    return {k: row[k] for k in ("method", "knob", "n", "paired_n", "changes", "change_upper95", "mean_acceptance_length",
                                "acceptance_length_vs_lossless", "tokens_per_s_vs_lossless",
                                "tokens_per_s_batch1_vs_lossless", "accuracy_change", "accuracy_change_lower95",
                                "mcnemar_p")}


def _fmt(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


def _cell(s) -> str:
    """A matched-quality cell: the point and its answer changes."""
    return _point_cell(s, lambda: f"{s['changes']}/{s['paired_n']} changed, bound {100 * s['change_upper95']:.2f}%")


def _accuracy_cell(s) -> str:
    """A matched-accuracy cell: the point and its accuracy change."""
    return _point_cell(s, lambda: (f"accuracy {100 * s['accuracy_change']:+.2f}% on {s['paired_n']}, "
                                   f"bound {100 * s['accuracy_change_lower95']:+.2f}%"))


def _point_cell(s, evidence) -> str:
    if s is None:
        return "-"
    ratio = s["acceptance_length_vs_lossless"]
    ratio = "no paired ratio" if ratio is None else f"{ratio:.2f}x"
    return f"{s['mean_acceptance_length']:.2f} ({ratio}; {_method_and_knob(s, 'g')}; {evidence()})"


def _matched_table(heads, table: str, cell) -> list[str]:
    lines = ["| proposer | k | lossless | " + " | ".join(f"{FAMILY_LABELS[family]} <= {100 * b:g}%"
                                                       for family in METHOD_FAMILIES for b in BUDGETS) + " |",
             "|---|---|---|" + "---|" * (len(METHOD_FAMILIES) * len(BUDGETS))]
    for h in heads:
        cells = [cell(h[table][f"{b:g}"][family]) for family in METHOD_FAMILIES for b in BUDGETS]
        lines.append(f"| {h['proposer']} | {h['k']} | {_fmt(h['lossless_acceptance_length'])} (n={h['lossless_n']}) | "
                     + " | ".join(cells) + " |")
    return lines


def _method_and_knob(row, knob_format: str = "") -> str:
    return row["method"] if row["knob"] is None else f"{row['method']} {row['knob']:{knob_format}}"


def _markdown(rows, heads, setup) -> str:
    reference = next((r for r in rows if r["method"] == "alone"), None)
    lines = [
        f"Measured {setup['date']} on {setup['machine']}, vLLM {setup['vllm']}; target {setup['target']}, "
        f"draft_model draft {setup['draft']}. Greedy; chat template; concurrent = up to {setup['concurrency']} "
        f"requests in flight; batch 1 = {setup['batch1_items']} items one at a time. Screening subset "
        f"{setup['screen_items']} items, confirmation set {setup['confirm_items']} (GSM8K items after the judge's "
        f"training slice, all HumanEval problems). Command: `{setup['command']}`.",
        "",
    ]
    mixed = [r for r in rows if r.get("timed_items_all_cores")]
    if mixed:
        lines += ["Timings with the model worker on every core (`--all-cores`; vLLM's CPU default leaves one core to "
                  "its scheduler, which on 2 cores is about 1.6x slower): "
                  + ", ".join(f"{r['proposer']} k={r['k']} {_method_and_knob(r)} "
                              f"{r['timed_items_all_cores']} of {r['timed_items']} timed items" for r in mixed)
                  + ". tok/s of a point mixes its segments' settings; acceptance and answers do not depend on it "
                  "(same texts and counters both ways on the --quick items).", ""]
    unpinned = [r for r in rows if r.get("timed_items_numba_workqueue") and r["proposer"] == "ngram"]
    if unpinned:
        lines += ["ngram timings with numba's workqueue threading layer (`--all-cores` sets it: with numba's OpenMP "
                  "layer vLLM's n-gram proposer left the target's GEMMs on one core, about 1.7x slower): "
                  + ", ".join(f"k={r['k']} {_method_and_knob(r)} "
                              f"{r['timed_items_numba_workqueue']} of {r['timed_items']} timed items" for r in unpinned)
                  + ".", ""]
    if reference is not None:
        lines.append(f"Target alone (no SD): {reference['n']} items, accuracy {reference['accuracy']:.3f}, "
                     f"{_fmt(reference['tokens_per_s'], '.1f')} tok/s concurrent, "
                     f"{_fmt(reference['tokens_per_s_batch1'], '.1f')} at batch 1.")
    for r in rows:
        if r["method"] == "lossless" and "compared_with_target_alone" in r:
            lines.append(f"- Lossless {r['proposer']} k={r['k']}: identical text to the target alone on "
                         f"{r['identical_to_target_alone']} of {r['compared_with_target_alone']} items.")
    lines += ["", "| proposer | k | method | knob | items | accept. length | vs lossless, same items | accept. rate "
              "| tok/s conc. | tok/s batch 1 | GSM8K acc. (n) | HumanEval pass (n) | text differs "
              "| answer changes vs lossless | 95% upper bound | acc. change (95% lower bound) | McNemar p |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['proposer']} | {r['k'] or ''} | {r['method']} | {'' if r['knob'] is None else r['knob']} | {r['n']} "
            f"| {_fmt(r['mean_acceptance_length'])} "
            f"| {'' if 'changes' not in r else _fmt(r['acceptance_length_vs_lossless'], '.3f') + 'x'} "
            f"| {_fmt(r['acceptance_rate'], '.3f')} "
            f"| {_fmt(r['tokens_per_s'], '.1f')} "
            f"| {_fmt(r['tokens_per_s_batch1'], '.1f')} | {_fmt(r['gsm8k_accuracy'], '.3f')} ({r['gsm8k_n']}) "
            f"| {_fmt(r['humaneval_accuracy'], '.3f')} ({r['humaneval_n']}) "
            + (f"| {r['text_changes']}/{r['paired_n']} | {r['changes']}/{r['paired_n']} "
               f"| {100 * r['change_upper95']:.2f}% | {100 * r['accuracy_change']:+.2f}% "
               f"({100 * r['accuracy_change_lower95']:+.2f}%) "
               f"| {r['mcnemar_p']:.3f} |" if "changes" in r else "| | | | | |"))
    partial = [r for r in rows if r.get("timed_items", r["n"]) < r["n"] and r["method"] != "alone"]
    if partial:
        lines += ["", "n/a acceptance and speed: a sitting ended inside the point, so its counters cover only "
                  + ", ".join(f"{r['timed_items']} of {r['n']} items ({r['method']} {r['knob']})" for r in partial)
                  + "; the next sitting on that server serves the items without counters once more for them."]
    unpaired = [r for r in rows if "changes" in r and r["mean_acceptance_length"] and not r["acceptance_length_vs_lossless"]]
    if unpaired:
        lines += ["", "n/a against lossless on the same items: lossless's counters were read over other runs of items "
                  "than " + ", ".join(f"{r['proposer']} k={r['k']} {_method_and_knob(r)}'s {r['n']}" for r in unpaired)
                  + ", so no paired acceptance ratio exists."]
    stopped = [r for r in rows if r.get("stopped_early")]
    if stopped:
        lines += ["", "Stopped early in the confirmation (more items could only add answer changes): "
                  + "; ".join(f"{r['proposer']} k={r['k']} {r['method']} {r['knob']}: {r['stopped_early']}"
                              for r in stopped) + "."]
    held_n = setup.get("held_out_items")
    scope = (f"on the {held_n} held-out items (the confirmation set without the {setup['screen_items']} screening "
             "items whose results chose the confirmed points; points only screened are not confirmed and are not "
             "in these tables; acceptance is the point's over all its items where its counters cannot give the "
             "held-out items alone)" if held_n is not None else "on every item a point was served on")
    caveat = ("Each table cell is the best of several points, and no correction is made for that choice: "
              "the bounds hold per point, not for the maximum (`selfjudge calibrate` replaces this with a "
              "family-wise valid Learn-then-Test certification).")
    lines += ["", f"Matched quality, {scope}: highest mean acceptance length (tokens per step) within each "
              "answer-change budget (exact 95% upper bound of the share of items whose answer differs from "
              f"lossless); judge / best training-free rule (-: no point qualifies). {caveat}", ""]
    lines += _matched_table(heads, "budgets", _cell)
    lines += ["", f"Matched accuracy (the SelfJudge paper's measure, in which gained and lost items cancel), {scope}: "
              "highest mean acceptance length whose paired accuracy change against lossless has a 95% lower bound "
              "(Tango's score method) of at least -B. The confirmation stage chose its points by answer changes, "
              "or with `--frontier accuracy` by the screening's accuracy change (-: no point qualifies):", ""]
    lines += _matched_table(heads, "accuracy_budgets", _accuracy_cell)
    confirmed = [r for r in rows if r.get("held_out_paired_n")]
    if confirmed:
        lines += ["", "Confirmed points on the held-out items (answer changes, 95% upper bound; accuracy change, 95% "
                  "lower bound): " + "; ".join(
                      f"{r['proposer']} k={r['k']} {_method_and_knob(r, 'g')}: {r['held_out_changes']}/"
                      f"{r['held_out_paired_n']}, {100 * r['held_out_change_upper95']:.2f}%, "
                      f"{100 * r['held_out_accuracy_change']:+.2f}% ({100 * r['held_out_accuracy_change_lower95']:+.2f}%)"
                      for r in confirmed) + "."]
    n = max((r.get("paired_n", 0) for r in rows), default=0)
    if n:
        lines += ["", f"Resolution: with {n} paired items, 0 changes bound the change rate at "
                  f"{100 * tasks.change_rate_upper_bound(0, n):.2f}% and 1 change at "
                  f"{100 * tasks.change_rate_upper_bound(1, n):.2f}%."]
    return "\n".join(lines) + "\n"


def _plots(rows, results: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for proposer in sorted({r["proposer"] for r in rows if r["method"] != "alone"}):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for r in rows:
            if r["proposer"] != proposer or "changes" not in r or not r["mean_acceptance_length"]:
                continue
            color, marker = METHOD_STYLE.get(r["method"], OTHER_STYLE)
            ax.errorbar(100 * r["change_rate"], r["mean_acceptance_length"],
                        xerr=[[0], [100 * (r["change_upper95"] - r["change_rate"])]], color=color, marker=marker,
                        markersize=4 + r["k"] / 2, alpha=0.8, capsize=2)
        for r in rows:
            if r["proposer"] == proposer and r["method"] == "lossless" and r["mean_acceptance_length"]:
                ax.scatter(0, r["mean_acceptance_length"], color="black", marker="o", s=20 + 4 * r["k"])
        for b in BUDGETS:
            ax.axvline(100 * b, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{100 * b:g}% budget", (100 * b, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -10), textcoords="offset points", fontsize=7, color="grey", rotation=90,
                        va="top")
        legend_beside(ax, list(dict.fromkeys(r["method"] for r in rows if r["proposer"] == proposer
                                             and r["method"] != "alone")),
                      "size: draft length\nbar: 95% upper bound")
        ax.set_xlabel("answer changes vs lossless (% of items)")
        ax.set_ylabel("mean acceptance length (tokens/step)")
        ax.set_title(f"{proposer}: Qwen2.5-Coder 1.5B target, GSM8K + HumanEval")
        fig.tight_layout()
        path = results / f"{tag}_{proposer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


HELD_OUT_FIELDS = ("n", "paired_n", "changes", "change_upper95", "text_changes", "gained", "lost", "accuracy_change",
                   "accuracy_change_lower95")


def held_out_rows(store, outcomes: Outcomes, screen_ids, rows: list[dict]) -> list[dict]:
    """The points' rows on the confirmation items outside the screening subset: the
    screening results chose which points were confirmed, so bounds that count those items
    again are optimistic. A point with no such items (screened only) has no row: it is not
    confirmed. Acceptance figures that the counters cannot give for these items alone (a
    counter segment spans screening and held-out items) are the point's over all its items,
    marked `acceptance_over_all_items`. Each row of `rows` gets `confirmed` and the held-out
    figures under `held_out_*`."""
    held_ids = set(outcomes.items) - set(screen_ids)
    held = point_rows(store, outcomes, only_ids=held_ids)
    by_key = {r["key"]: r for r in rows}
    for row in held:
        whole = by_key[row["key"]]
        if row["mean_acceptance_length"] is None and whole["mean_acceptance_length"] is not None:
            for name in ("mean_acceptance_length", "acceptance_length_vs_lossless", "tokens_per_s",
                         "tokens_per_s_vs_lossless", "acceptance_rate"):
                row[name] = whole.get(name)
            row["acceptance_over_all_items"] = True
    confirmed = {r["key"]: r for r in held}
    for row in rows:
        mine = confirmed.get(row["key"])
        row["confirmed"] = mine is not None
        if mine is not None and "changes" in mine:
            row.update({f"held_out_{name}": mine[name] for name in HELD_OUT_FIELDS})
    return held


CERTIFY_MEASURES = ("answer_changes", "accuracy")
CERTIFY_CONFIDENCE = 0.95
RULE_FAMILIES = ("judge", "top_alpha", "entropy", "fly")  # one fixed sequence each


def certified_points(store, outcomes: Outcomes, screen_ids, rows: list[dict], test_items=()) -> list[dict]:
    """Learn then Test on the committed store, as `selfjudge calibrate` certifies (its
    pairing, p-values and procedure): per server, measure and budget, the confirmed points
    (the screening items chose them, so those items are not counted), each rule's points
    strictest first, Bonferroni over the rules present; per method family the certified point
    with the longest acceptance over the confirmation set, with its risk on the test items
    (`test_items`: items outside everything else) where served. A point stopped early (its
    answer changes ruled every budget out) stays in its sequence, failed, as in calibrate:
    leaving it out would skip a failure the data made. A point a sitting has not finished is
    left out: that depends on the clock, not on the answers."""
    from selfjudge_vllm import calibrate, certify

    calibration = sorted(set(outcomes.items) - set(screen_ids))
    if not calibration:  # --quick: every item is a screening item
        return []
    test_outcomes, test_ids = Outcomes(test_items), [i.id for i in test_items]
    out = []
    for server in sorted({(r["proposer"], r["k"]) for r in rows if r["method"] == "lossless"}):
        group = {r["key"]: r for r in rows if (r["proposer"], r["k"]) == server}
        lossless = point_key(server, "lossless", None)
        base = store.done(lossless)
        complete = {key for key in group if set(calibration) <= store.done(key).keys()}
        sequences = {f: sorted((r for r in group.values() if r["method"] == f
                                and (r["key"] in complete or r["stopped_early"])),
                               key=lambda r: -r["knob"]) for f in RULE_FAMILIES}
        sequences = {f: seq for f, seq in sequences.items() if seq}
        for measure in CERTIFY_MEASURES:
            risks = {r["key"]: calibrate.paired_risk(outcomes, measure, store.done(r["key"]), base, calibration)
                     for seq in sequences.values() for r in seq}
            for budget in BUDGETS:
                level = (1 - CERTIFY_CONFIDENCE) / max(1, len(sequences))
                candidates = [certify.Candidate(f, r["key"], risks[r["key"]].p_value(measure, budget, level)
                                                if r["key"] in complete else 1.0)
                              for f, seq in sequences.items() for r in seq]
                certified = {c.point for c in certify.certify(candidates, 1 - CERTIFY_CONFIDENCE)} if candidates else set()
                entry = {"proposer": server[0], "k": server[1], "measure": measure, "budget": budget,
                         "calibration_items": len(calibration), "rules": list(sequences),
                         "lossless_acceptance_length": group[lossless]["mean_acceptance_length"], "families": {}}
                for family, methods in METHOD_FAMILIES.items():
                    mine = [group[k] for k in certified if group[k]["method"] in methods]
                    best = max(mine, key=lambda r: r["mean_acceptance_length"] or 0.0, default=None)
                    if best is None:
                        tried = any(f in methods for f in sequences)
                        entry["families"][family] = {"certified": None, "tried": tried}
                        continue
                    risk = risks[best["key"]]
                    cell = {"certified": best["key"], "method": best["method"], "knob": best["knob"], "n": risk.n,
                            "observed_risk": risk.observed(measure),
                            "upper_bound": certify.risk_upper_bound(measure, risk.n, level, risk.changes, risk.lost,
                                                                    risk.gained),
                            "acceptance_vs_lossless": best.get("acceptance_length_vs_lossless")}
                    if test_ids:
                        test = calibrate.paired_risk(test_outcomes, measure, store.done(best["key"]), base, test_ids)
                        cell["test"] = {"n": test.n, "observed_risk": test.observed(measure) if test.n else None}
                    entry["families"][family] = cell
                out.append(entry)
    return out


def certified_like_the_test_items(store, items, screen_ids, rows: list[dict], test_items) -> list[dict]:
    """The certified table recomputed on the confirmation items of the test items' families
    only. A certificate covers traffic drawn like its calibration prompts; the test items are
    GSM8K only while the confirmation set mixes in HumanEval, so this is the certificate the
    test items check. Empty without test items or when the confirmation set has no other
    family."""
    families = {i.family for i in test_items}
    like = [i for i in items if i.family in families]
    if not test_items or len(like) == len(items):
        return []
    return certified_points(store, Outcomes(like), screen_ids, rows, test_items)


def _certified_markdown(entries: list[dict], heading: str = "Certified points (Learn then Test on the held-out "
                        "confirmation items)", preface: str = "") -> list[str]:
    if not entries:
        return []
    lines = [f"## {heading}", "", *([preface, ""] if preface else []),
             f"Per server, measure and budget: the certified point with the longest acceptance, per family, at "
             f"{100 * CERTIFY_CONFIDENCE:g}% confidence, on the {entries[0]['calibration_items']} confirmation items "
             "outside the screening subset (which chose the points). `selfjudge calibrate`'s procedure: each rule's "
             "points strictest first (fixed sequence), Bonferroni over the rules measured on that server; exact "
             "binomial p-values for answer changes, exact unconditional ones for accuracy lost. Cell: knob, "
             "acceptance length vs lossless, observed risk (upper bound)"
             + ("; test: risk on the test items" if any("test" in c for e in entries for c in e["families"].values())
                else "") + ". 'lossless only': the family had points, none certified.", "",
             "| server | measure | budget | " + " | ".join(FAMILY_LABELS[f] for f in METHOD_FAMILIES) + " |",
             "|---|---|---:|" + "---|" * len(METHOD_FAMILIES)]
    for e in entries:
        cells = []
        for family in METHOD_FAMILIES:
            c = e["families"][family]
            if c["certified"] is None:
                cells.append("lossless only" if c["tried"] else "not measured")
                continue
            ratio = f"{c['acceptance_vs_lossless']:.3f}x" if c["acceptance_vs_lossless"] else "n/a"
            test = c.get("test")
            test_text = (f"; test {100 * test['observed_risk']:.2f}% (n={test['n']})"
                         if test and test["observed_risk"] is not None else "")
            cells.append(f"{c['method']} {c['knob']:g}: {ratio}, {100 * c['observed_risk']:.2f}% "
                         f"(<= {100 * c['upper_bound']:.2f}%){test_text}")
        lines.append(f"| {e['proposer']} k={e['k']} | {e['measure']} | {100 * e['budget']:g}% | " + " | ".join(cells) + " |")
    return lines + [""] + _certificate_resolution(entries)


def _test_markdown(tested: list[dict], n_items: int) -> list[str]:
    """Every point served on the test items, paired with its server's lossless there."""
    if not tested:
        return []
    lines = [f"## The test items ({n_items} GSM8K items outside the judge's training prompts and the confirmation set)",
             "", "Every point the test stage served on them, paired with the same server's lossless on the same "
             "items: the certified points, and on the headline server each family's fastest point, certified or "
             "not. Answer changes with a 95% upper bound, accuracy change with a 95% lower bound.", "",
             "| server | point | items | acceptance vs lossless | text differs | answers changed (bound) "
             "| accuracy change (bound) | GSM8K accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in tested:
        point = "lossless" if r["method"] == "lossless" else f"{r['method']} {r['knob']:g}"
        if r["method"] == "lossless":
            lines.append(f"| {r['proposer']} k={r['k']} | lossless | {r['n']} | | | | | {r['accuracy']:.3f} |")
            continue
        if "paired_n" not in r:  # no lossless on these items yet
            continue
        ratio = r["acceptance_length_vs_lossless"]
        lines.append(
            f"| {r['proposer']} k={r['k']} | {point} | {r['paired_n']} | {_fmt(ratio, '.3f')}{'x' if ratio else ''} "
            f"| {r['text_changes']} | {r['changes']} ({100 * r['change_upper95']:.2f}%) "
            f"| {100 * r['accuracy_change']:+.2f}% ({100 * r['accuracy_change_lower95']:+.2f}%) | {r['accuracy']:.3f} |")
    return lines + [""]


LIKE_TEST_HEADING = "Certified on the GSM8K confirmation items alone (the test items' distribution)"
LIKE_TEST_PREFACE = ("A certificate covers traffic drawn like its calibration prompts. The test items are GSM8K only, "
                     "the table above calibrates on a GSM8K/HumanEval mix; here the same procedure, on the same "
                     "points, counts the GSM8K confirmation items only, so its test cells check a certificate "
                     "against its own distribution. A test cell is shown where the test stage served the point.")


RESOLUTION_GAINED = 10  # an illustrative count of items gained, about 3% of the calibration items


def _certificate_resolution(entries: list[dict]) -> list[str]:
    """What the certificate can resolve with these many items and rules: per budget, the most
    answer changes, and the most items lost (with none, and with RESOLUTION_GAINED, gained),
    that still certify at the family-wise level."""
    from selfjudge_vllm import calibrate

    def most(count, what):
        return f"at most {count} {what}" if count >= 0 else f"not even 0 {what}"

    lines = []
    for n, rules in sorted({(e["calibration_items"], len(e["rules"])) for e in entries}):
        level = (1 - CERTIFY_CONFIDENCE) / max(1, rules)
        parts = []
        for budget in BUDGETS:
            changes = calibrate.largest_certifiable_count(n, budget, level)
            lost = [calibrate.largest_certifiable_loss(n, budget, level, g) for g in (0, RESOLUTION_GAINED)]
            parts.append(f"{100 * budget:g}%: {most(changes, 'answer changes')}; {most(lost[0], 'items lost')} with "
                         f"none gained, {most(lost[1], 'lost')} with {RESOLUTION_GAINED} gained")
        lines.append(f"What certifies with {n} items and {rules} rules (each tested at level {level:.4g}): "
                     + "; ".join(parts) + ".")
    return lines + [""] if lines else []


# The issue's target server: there the test stage also serves each family's fastest point.
HEADLINE_SERVER = ("ngram", 8)


def test_plan(certified: list[dict], rows: list[dict], fastest_on=(HEADLINE_SERVER,)) -> dict[tuple[str, int], list[str]]:
    """Per server, the points the test stage serves on the test items: lossless and every
    certified point of the table; on the `fastest_on` servers also each family's fastest
    point measured on the whole confirmation set, certified or not (its test risk shows what
    certification ruled out; 300 items cost about 40 minutes a point here, so only where the
    comparison is made)."""
    plan: dict[tuple[str, int], list[str]] = {}
    for e in certified:
        keys = plan.setdefault((e["proposer"], e["k"]), [point_key((e["proposer"], e["k"]), "lossless", None)])
        keys += [c["certified"] for c in e["families"].values() if c["certified"] and c["certified"] not in keys]
    for server, keys in plan.items():
        if server not in fastest_on:
            continue
        group = [r for r in rows if (r["proposer"], r["k"]) == server and not r["stopped_early"]
                 and r.get("acceptance_length_vs_lossless") and r["n"] == max(x["n"] for x in rows)]
        for methods in METHOD_FAMILIES.values():
            fastest = max((r for r in group if r["method"] in methods),
                          key=lambda r: r["acceptance_length_vs_lossless"], default=None)
            if fastest and fastest["key"] not in keys:
                keys.append(fastest["key"])
    return plan


def write(store, items, screen_ids, results: Path, tag: str, setup: dict, test_items=()) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    outcomes = Outcomes(items)
    rows = point_rows(store, outcomes)
    screen_rows = point_rows(store, outcomes, only_ids=set(screen_ids))
    held = held_out_rows(store, outcomes, screen_ids, rows)
    # The matched tables count held-out items only: confirmed points, bounds on items that
    # did not choose them.
    heads = headlines(held)
    certified = certified_points(store, outcomes, screen_ids, rows, test_items)
    certified_like_test = certified_like_the_test_items(store, items, screen_ids, rows, test_items)
    test_outcomes = Outcomes(test_items)
    tested = point_rows(store, test_outcomes) if test_items else []
    setup = {**setup, "held_out_items": len(set(outcomes.items) - set(screen_ids))}
    plots = _plots(rows, results, tag) if rows else []
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    report = {"setup": setup, "headlines": heads, "certified": certified,
              "certified_like_the_test_items": certified_like_test, "points": public,
              "screening": [{k: v for k, v in r.items() if not k.startswith("_")} for r in screen_rows],
              "outcomes": {r["key"]: r["_results"] for r in rows},
              "test_points": [{k: v for k, v in r.items() if not k.startswith("_")} for r in tested],
              "test_outcomes": {r["key"]: r["_results"] for r in tested}}
    fields = list(dict.fromkeys(k for r in public for k, v in r.items() if not isinstance(v, (list, dict))))
    shown = ", ".join(f"`{tasks.shown_path(results / p)}`" for p in plots)
    markdown = (_markdown(rows, heads, setup) + "\n".join(["", *_certified_markdown(certified),
                                                         *_test_markdown(tested, len(test_items)),
                                                         *_certified_markdown(certified_like_test, LIKE_TEST_HEADING,
                                                                              LIKE_TEST_PREFACE)])
                + (f"\nPlots: {shown}\n" if plots else ""))
    write_files(results, tag, report, public, fields, markdown)
    return report
