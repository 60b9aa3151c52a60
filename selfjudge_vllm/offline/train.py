"""`selfjudge train`: labels from scores, logistic regression, the judge artifact.

Labels: each mismatch gives two rows (scores.py has the score): the hidden state at m of y'
labelled "accept" when score <= tau (the substitution keeps the meaning), and the hidden
state at m of y, always "accept" (the target's own token). The head predicts P(accept).

tau is given (`--tau`), or set so that a target share of mismatches is labelled "reject"
(`--reject-share`, on the training prompts), or calibrated on the validation prompts'
answer outcomes (`--tau-from-answers`, needs `selfjudge label --answer-pattern`): the tau
whose labels (reject = score > tau) best agree, by balanced accuracy, with "the final
answer changed after substituting the draft token and letting the target finish".

Training: StandardScaler + LogisticRegression on the training prompts. C is chosen by ROC-AUC
on mismatch rows of a share of the training prompts held out from a first fit, then the head is
refitted on every training prompt; the scaler is folded into the exported weights. The
validation prompts (a split by prompt, never by row) set no weight and no C, so a head's
ROC-AUC there is held out; they do set the operating points (thresholds), `auto`'s choice of
feature set, and with `--tau-from-answers` tau itself (and so every label).

Feature sets (`--features`, selfjudge_vllm/features.py): `hidden` is the paper's head above
(the ablation); `logits` is a logistic regression on the logit features of each mismatch
(draft_logratio, verify_confidence, next_confidence; runs labelled by this release record
them); `both` stacks the two: an out-of-fold hidden-state score (the hidden head refitted on
the other folds' prompts) and the logit features go into a small second logistic regression,
so L2 does not drown three scalars among thousands of hidden dimensions; the stack folds
into one dot product plus three scalar products. Those two are fitted on mismatch rows only
(the rows the head decides online). `auto` (default) fits every set the run supports, reports
them side by side and serves the best by validation mismatch ROC-AUC (a choice made on the
validation prompts: the served set's ROC-AUC there is then the best of three, not held out;
`--features` names one set).

Operating points and the "mismatch" metrics are computed on the validation *mismatch* rows
only: online the head decides nothing else (a draft equal to the target's choice is accepted
by standard verification). The own-token rows are easy positives, so metrics over all rows
(`validation_roc_auc`) flatter the head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, OperatingPoint, TargetIdentity
from selfjudge_vllm.features import FEATURE_SETS, HIDDEN, LOGIT_FEATURES
from selfjudge_vllm.offline.label import InputError
from selfjudge_vllm.offline.prompts import PROMPT_DIGESTS_FILE, PROMPT_DIGESTS_KEY
from selfjudge_vllm.offline.scores import DEFAULT_SUFFIX_MODE
from selfjudge_vllm.offline.store import PRECISION, RunDir, feature_stage, load_run, provenance, usable_shards

# Down to 1e-6: the hidden-state heads (1,536 dimensions, a few thousand rows) chose the
# smallest C at 1e-4 on the chat label run.
C_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_C = 1.0  # scikit-learn's, where too few training prompts leave none to choose C on
# The share of the training prompts held out from a first fit to choose C on.
C_SELECTION_SHARE = 0.25
STACK_FOLDS = 5
FEATURE_CHOICES = ("auto", *FEATURE_SETS)


@dataclass(frozen=True)
class TrainSettings:
    suffix_length: int = 20
    suffix_mode: str = DEFAULT_SUFFIX_MODE
    tau: float | None = None
    reject_share: float | None = None
    tau_from_answers: bool = False
    validation_share: float = 0.2
    recall_target: float = 0.8
    seed: int = 0
    features: str = "auto"
    # Train on the complete shards of a run that lacks some (recorded in the report).
    allow_partial_run: bool = False
    # Fit on the training prompts' mismatches up to this many (whole prompts, in a seeded order;
    # the validation prompts stay all): a point of a data-scaling curve. None: all.
    max_train_mismatches: int | None = None


def tau_from_outcomes(scores: np.ndarray, changed: np.ndarray) -> tuple[float, float]:
    """The tau maximising balanced accuracy of (score > tau) against `changed`; ties go
    to the larger tau (fewer rejections). Only taus that leave both labels in use are
    candidates: a head cannot be trained on one class. Returns (tau, balanced accuracy)."""
    from sklearn.metrics import balanced_accuracy_score

    candidates = np.unique(scores)[:-1]
    if len(candidates) == 0:
        raise InputError("all calibration scores are equal; no tau separates them")
    best_tau, best_acc = float(candidates[0]), -1.0
    for tau in candidates:
        accepted = scores > tau
        acc = (balanced_accuracy_score(changed, accepted) if len(set(changed)) > 1
               else float(np.mean(changed == accepted)))
        if acc >= best_acc:
            best_tau, best_acc = float(tau), float(acc)
    return best_tau, best_acc


def proposers_of(record: dict) -> list[str]:
    """The proposers that draft a mismatch (runs labelled without --ngram-k: the draft model)."""
    return record.get("proposers", ["draft_model"])


class Outcomes:
    """Whether the final answer stayed unchanged after each mismatch's substitution, from the
    runs' outcomes stages (runs labelled before outcomes named the draft: one per position)."""

    def __init__(self, run_dir: str | Path | None = None, allow_partial: bool = False,
                 runs: list[tuple[str, RunDir]] | None = None):
        """One run folder, or (record id prefix, run) pairs (load_training_data's)."""
        runs = runs if runs is not None else [("", RunDir(run_dir))]
        self._unchanged = {(prefix + r["id"], r["m"], r.get("draft")): bool(r["unchanged"])
                           for prefix, run in runs if run.complete_shards("outcomes", allow_partial=True)
                           for r in run.read_stage("outcomes", allow_partial)}

    def __bool__(self) -> bool:
        return bool(self._unchanged)

    def changed(self, record: dict) -> bool | None:
        """None where the mismatch has no outcome (its prompt has no reference answer)."""
        for key in ((record["id"], record["m"], record["draft"]), (record["id"], record["m"], None)):
            if key in self._unchanged:
                return not self._unchanged[key]
        return None


def split_by_prompt(ids: list[str], validation_share: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: whole prompts go to one side."""
    unique = sorted(set(ids))
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(unique) * validation_share)) if len(unique) > 1 else 0
    val_ids = set(rng.permutation(unique)[:n_val].tolist())
    return np.array([i in val_ids for i in ids])


def limit_training(ids: list[str], is_val: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Rows kept when training on at most `limit` mismatches: every validation row, and whole
    training prompts in a seeded order while their mismatches fit (at least one prompt). A
    smaller limit keeps a prefix of a larger one's prompts, so a scaling curve's sizes nest."""
    counts: dict[str, int] = {}
    for i, v in zip(ids, is_val):
        if not v:
            counts[i] = counts.get(i, 0) + 1
    order = np.random.default_rng(seed + 1).permutation(sorted(counts)).tolist()
    kept, total = set(), 0
    for prompt in order:
        if kept and total + counts[prompt] > limit:
            break
        kept.add(prompt)
        total += counts[prompt]
    return np.array([bool(v) or i in kept for i, v in zip(ids, is_val)])


def fold_standardisation(coef: np.ndarray, intercept: float, mean: np.ndarray, scale: np.ndarray):
    """w.((x - mean)/scale) + b  ==  (w/scale).x + (b - sum(w*mean/scale))."""
    weight = coef / scale
    return weight, float(intercept - np.dot(weight, mean))


def operating_points(y_true: np.ndarray, p_accept: np.ndarray, recall_target: float,
                     rows: str = "validation") -> dict[str, OperatingPoint]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    points: dict[str, OperatingPoint] = {}
    precision, recall, thresholds = precision_recall_curve(y_true, p_accept)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    best = int(np.argmax(f1))
    points["best_f1"] = _point(thresholds[best], f"maximises F1 of 'accept' on {rows}",
                               precision[best], recall[best])
    fpr, tpr, roc_thresholds = roc_curve(y_true, p_accept)
    finite = np.isfinite(roc_thresholds)
    j = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
    prec_at = _precision_at(y_true, p_accept, roc_thresholds[j])
    points["youden"] = _point(roc_thresholds[j], f"maximises TPR - FPR on {rows}", prec_at, tpr[j])
    ok = np.where(recall[:-1] >= recall_target)[0]
    if len(ok):
        k = int(ok[-1])  # highest threshold that still reaches the recall target
        points[f"recall_{int(recall_target * 100)}"] = _point(
            thresholds[k], f"highest threshold with recall >= {recall_target} on {rows}",
            precision[k], recall[k])
    return points


# Operating points by how much the judge relaxes: the share of validation mismatches accepted.
# They are calibrate's judge grid. 1% and 2% were added when 5%, then the strictest, changed
# too many GSM8K answers and chat texts on the Qwen pair to be certified within 5%, where FLy
# and top_alpha had stricter ends (docs/benchmarks.md).
ACCEPT_SHARES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)


def accept_share_points(labels: np.ndarray, p_accept: np.ndarray) -> dict[str, OperatingPoint]:
    """`accepts_Npct`: the lowest threshold at which the head accepts at most N% of the
    validation mismatches, with the label precision and recall of what it accepts there."""
    points = {}
    for share in ACCEPT_SHARES:
        # Strictly above the (1 - share) quantile, so at most that share passes.
        threshold = float(np.nextafter(np.quantile(p_accept, 1.0 - share, method="higher"), 1.0))
        chosen = p_accept >= threshold
        point = _point(threshold, f"accepts at most {share:.0%} of validation mismatches",
                       _precision_at(labels, p_accept, threshold), labels[chosen].sum() / max(labels.sum(), 1))
        points[f"accepts_{round(share * 100)}pct"] = point.model_copy(
            update={"metrics": {**point.metrics, "mismatch_accept_share": float(chosen.mean())}})
    return points


CHANGE_BUDGETS = (0.01, 0.02, 0.05)


def response_change_share(response_of: np.ndarray, m: np.ndarray, p_accept: np.ndarray, changed: np.ndarray,
                          threshold: float) -> float:
    """Estimated share of responses whose final answer changes when the head accepts at
    `threshold`: a response changes when the first mismatch the head accepts (in response
    order) changed the answer in the outcomes stage. Later substitutions happen on a
    continuation the run never saw, so this is a lower bound."""
    responses = np.unique(response_of)
    changed_responses = 0
    for response in responses:
        mine = np.flatnonzero((response_of == response) & (p_accept >= threshold))
        if len(mine):
            changed_responses += bool(changed[mine[np.argmin(m[mine])]])
    return changed_responses / len(responses)


def answer_change_points(response_of: np.ndarray, m: np.ndarray, p_accept: np.ndarray,
                         changed: np.ndarray) -> dict[str, OperatingPoint]:
    """`estimated_changes_Npct`: the lowest threshold at which, and at every threshold above
    it, the estimated share of changed responses (response_change_share) is at most N%. An
    estimate from the label run (serving measured other rates), not a guarantee: `selfjudge
    calibrate` certifies a point on the operator's prompts."""
    candidates = np.concatenate([[np.nextafter(p_accept.max(), 1.0)], np.unique(p_accept)[::-1]])
    shares = np.array([response_change_share(response_of, m, p_accept, changed, t) for t in candidates])
    # Non-decreasing as the threshold falls (the envelope), so each budget's point is safe.
    envelope = np.maximum.accumulate(shares)
    n = len(np.unique(response_of))
    points = {}
    for budget in CHANGE_BUDGETS:
        last_ok = int(np.flatnonzero(envelope <= budget + 1e-12).max(initial=0))
        threshold = float(candidates[last_ok])
        points[f"estimated_changes_{round(budget * 100)}pct"] = OperatingPoint(
            threshold=float(np.clip(threshold, 1e-6, 1 - 1e-6)),
            description=f"ESTIMATE, not certified: at most {budget:.0%} of responses change their final answer "
                        f"({n} validation "
                        "responses with answer outcomes; first accepted substitution per response, a lower bound)",
            metrics={"estimated_response_change_share": float(envelope[last_ok]), "responses": float(n)})
    return points


def _precision_at(y_true, p, threshold) -> float:
    chosen = p >= threshold
    return float(y_true[chosen].mean()) if chosen.any() else 0.0


def _point(threshold: float, description: str, precision: float, recall: float) -> OperatingPoint:
    t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    return OperatingPoint(threshold=t, description=description,
                          metrics={"precision": float(precision), "recall": float(recall)})


@dataclass
class _Head:
    """A fitted head in serving form: logit = x . weight + evidence . scalar + bias."""

    features: tuple[str, ...]
    weight: np.ndarray | None
    scalar: np.ndarray | None
    bias: float
    C: float
    # C_GRID's ROC-AUC on the training prompts held out to choose C (empty: DEFAULT_C, none to choose on).
    c_selection_roc_auc: dict = field(default_factory=dict)

    def logits(self, x_rows: np.ndarray, evidence: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        out = np.full(len(x_rows), self.bias)
        if self.weight is not None:
            out = out + x_rows @ self.weight
        if self.scalar is not None:
            out = out + evidence[rows] @ self.scalar
        return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def evidence_matrix(records: list[dict]) -> np.ndarray | None:
    """[mismatches, len(LOGIT_FEATURES)] logit features (NaN where one does not exist), or
    None for a run labelled before they were recorded."""
    if not all("evidence" in r for r in records):
        return None
    return np.array([[np.nan if r["evidence"][f] is None else r["evidence"][f] for f in LOGIT_FEATURES]
                     for r in records], dtype=np.float64)


def _logistic(xs: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xs, y)


def _fit_choosing_c_on_training_prompts(x, y, ids, fit_rows, score_rows, seed: int):
    """Standardised logistic regression on `fit_rows` (the one fitting loop every head uses).
    C is the one of C_GRID with the best ROC-AUC on a share of the training prompts
    (C_SELECTION_SHARE, whole prompts) held out from a first fit, on their rows among
    `score_rows`; then the head is refitted on every row of `fit_rows` at that C. Rows outside
    `fit_rows` (the validation prompts) choose nothing. Returns (C, scaler, model,
    {C: selection ROC-AUC}); C is DEFAULT_C, and the dict empty, where the held-out share
    lacks a label."""
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    fit_index = np.flatnonzero(fit_rows)
    held_out = np.zeros(len(y), dtype=bool)
    held_out[fit_index] = split_by_prompt([ids[k] for k in fit_index], C_SELECTION_SHARE, seed)
    first_fit, select = fit_rows & ~held_out, held_out & score_rows
    by_c = {}
    if len(set(y[first_fit])) == 2 and len(set(y[select])) == 2:
        scaler = StandardScaler().fit(x[first_fit])
        xs_fit, xs_select = scaler.transform(x[first_fit]), scaler.transform(x[select])
        for c in C_GRID:
            model = _logistic(xs_fit, y[first_fit], c, seed)
            by_c[c] = float(roc_auc_score(y[select], model.decision_function(xs_select)))
    # Ties (tiny held-out shares) go to the C nearest scikit-learn's default.
    best = max(by_c, key=lambda c: (by_c[c], -abs(np.log10(c / DEFAULT_C)))) if by_c else DEFAULT_C
    scaler = StandardScaler().fit(x[fit_rows])
    return best, scaler, _logistic(scaler.transform(x[fit_rows]), y[fit_rows], best, seed), by_c


def _fit_scalar_head(features: np.ndarray, labels: np.ndarray, ids, fit_rows, seed: int, names) -> _Head:
    """Standardised logistic regression on a few scalar columns of the mismatch rows."""
    best, scaler, model, by_c = _fit_choosing_c_on_training_prompts(features, labels, ids, fit_rows, fit_rows, seed)
    scalar, bias = fold_standardisation(model.coef_[0], model.intercept_[0], scaler.mean_, scaler.scale_)
    return _Head(tuple(names), None, scalar, bias, best, by_c)


def _out_of_fold_hidden_logits(x, y, ids, is_val, c, seed, served_logits) -> np.ndarray:
    """The hidden-state head's logit for every mismatch, as stacking needs it: for a training
    prompt, from a head fitted (paper's rows: substituted and own-token) on the other folds'
    training prompts; for a validation prompt, the served hidden head's (`served_logits`)."""
    from sklearn.preprocessing import StandardScaler

    n = len(ids)
    out = np.array(served_logits, dtype=np.float64)
    train_prompts = sorted({i for i, v in zip(ids, is_val) if not v})
    order = np.random.default_rng(seed).permutation(train_prompts)
    fold_of = {p: k % STACK_FOLDS for k, p in enumerate(order)}
    row_fold = np.array([fold_of.get(i, -1) for i in ids] * 2)  # x = [substituted, original]
    for fold in range(min(STACK_FOLDS, len(train_prompts))):
        fit = (row_fold >= 0) & (row_fold != fold)
        if len(set(y[fit])) < 2:
            continue
        scaler = StandardScaler().fit(x[fit])
        model = _logistic(scaler.transform(x[fit]), y[fit], c, seed)
        held = np.where(row_fold[:n] == fold)[0]
        if len(held):
            out[held] = model.decision_function(scaler.transform(x[held]))
    return out


# -- training, in steps: data, labels (tau), heads, the served head, operating points, report --


# Run settings that must agree for runs to train one head (the prompts, lengths, shard sizes
# and engine sizing may differ: they change which mismatches exist, not what a label means).
AGREEING_SETTINGS = ("suffix_lengths", "engine.dtype")


@dataclass
class TrainingData:
    """Every scored mismatch of the runs (ids prefixed "<k>:" when there are several, so the
    split stays by prompt), their hidden-state rows, the target and what was read."""

    records: list[dict]
    substituted: torch.Tensor | None
    original: torch.Tensor | None
    target: dict
    shards: list[dict]
    outcomes: Outcomes

    def subset(self, keep: np.ndarray) -> TrainingData:
        """The rows where `keep` is true."""
        rows = torch.from_numpy(np.flatnonzero(keep))
        return TrainingData([r for r, k in zip(self.records, keep) if k],
                            None if self.substituted is None else self.substituted[rows],
                            None if self.original is None else self.original[rows], self.target, self.shards,
                            self.outcomes)


def _setting(settings: dict, dotted: str):
    value = settings
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_runs_agree(runs: list[RunDir]) -> None:
    """Refuse runs labelled for another target (architecture, sizes) or with other label
    settings (AGREEING_SETTINGS), naming the difference."""
    if len(runs) < 2:
        return
    first = runs[0]
    first_target = {k: v for k, v in first.read_json("target.json").items() if k != "name"}
    first_settings = first.read_json("run.json")
    for run in runs[1:]:
        target = {k: v for k, v in run.read_json("target.json").items() if k != "name"}
        differ = sorted(k for k in set(target) | set(first_target) if target.get(k) != first_target.get(k))
        if differ:
            raise InputError(f"runs {first.root} and {run.root} were labelled for different targets "
                             f"({', '.join(f'{k}: {first_target.get(k)} vs {target.get(k)}' for k in differ)})")
        settings = run.read_json("run.json")
        for key in AGREEING_SETTINGS:
            if _setting(settings, key) != _setting(first_settings, key):
                raise InputError(f"runs {first.root} and {run.root} differ in {key} "
                                 f"({_setting(first_settings, key)} vs {_setting(settings, key)}); "
                                 "label them with the same setting to train one head")


def load_training_data(run_dirs: list[str | Path], with_hidden: bool, allow_partial: bool) -> TrainingData:
    runs = [RunDir(d) for d in run_dirs]
    if len({run.root.resolve() for run in runs}) < len(runs):
        raise InputError("a run folder is given twice")
    check_runs_agree(runs)
    prefixes = [""] if len(runs) == 1 else [f"{k}:" for k in range(len(runs))]
    records, subs, origs, shards = [], [], [], []
    for prefix, run in zip(prefixes, runs):
        run_records, sub, orig = load_run(run.root, with_hidden=with_hidden, allow_partial=allow_partial)
        records += [dict(r, id=prefix + r["id"]) for r in run_records] if prefix else run_records
        subs.append(sub)
        origs.append(orig)
        shards.append({"run": str(run.root), "total": run.shard_count(),
                       "used": usable_shards(run, with_hidden, allow_partial=True),
                       # float32 as labelled, or the float16 copy where a clone has only that
                       "hidden_state_precision": PRECISION[feature_stage(run)] if with_hidden else None})
    substituted = torch.cat(subs) if with_hidden else None
    original = torch.cat(origs) if with_hidden else None
    return TrainingData(records, substituted, original, runs[0].read_json("target.json"), shards,
                        Outcomes(runs=list(zip(prefixes, runs)), allow_partial=allow_partial))


def label_scores(records: list[dict], settings: TrainSettings) -> np.ndarray:
    """Each mismatch's semantic preservation score at the settings' N and suffix mode."""
    n_key = str(settings.suffix_length)
    try:
        return np.array([r["scores"][settings.suffix_mode][n_key] for r in records])
    except KeyError:
        raise InputError(
            f"the run has no scores for suffix mode {settings.suffix_mode!r} and length "
            f"{settings.suffix_length}; it has lengths {sorted(records[0]['scores']['max'], key=int)}"
        ) from None


def choose_tau(scores: np.ndarray, is_val: np.ndarray, data: TrainingData,
               settings: TrainSettings) -> tuple[float, dict | None]:
    """tau as given, from the reject share (training prompts), or calibrated on the
    validation prompts' answer outcomes; with the calibration's figures."""
    if settings.reject_share is not None:
        return float(np.quantile(scores[~is_val], 1.0 - settings.reject_share)), None
    if not settings.tau_from_answers:
        return settings.tau, None
    rows = [k for k, r in enumerate(data.records) if is_val[k] and data.outcomes.changed(r) is not None]
    if len(rows) < 2:
        raise InputError("--tau-from-answers needs answer outcomes on validation prompts "
                         "(run `selfjudge label --answer-pattern ...` on prompts with \"answer\")")
    changed = np.array([data.outcomes.changed(data.records[k]) for k in rows])
    tau, agreement = tau_from_outcomes(scores[rows], changed)
    return tau, {"mismatches": len(rows), "answer_changed": int(changed.sum()), "balanced_accuracy": agreement}


@dataclass
class FittedHeads:
    """Every head fitted, and the rows they are compared on."""

    heads: dict[str, _Head]
    x_sub: np.ndarray  # [mismatches, H] substituted hidden rows (H = 0 without them)
    evidence: np.ndarray | None  # [mismatches, len(LOGIT_FEATURES)]
    eval_rows: np.ndarray  # validation mismatches with every logit feature
    # The hidden-state head on all rows (the paper's), for the report and tiny runs.
    hidden_model: object | None = None
    xs_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    best_c: float | None = None
    auc: float | None = None


def fit_heads(data: TrainingData, sub_label: np.ndarray, is_val: np.ndarray, settings: TrainSettings,
              with_hidden: bool) -> FittedHeads:
    """The hidden-state head (paper's rows), the logit-feature head and their stack, each fitted
    and its C chosen on the training prompts alone."""
    from sklearn.metrics import roc_auc_score

    records = data.records
    ids = [r["id"] for r in records]
    heads, fitted = {}, FittedHeads({}, np.zeros((len(records), 0)), None, np.zeros(0, dtype=bool))
    if with_hidden:
        x = torch.cat([data.substituted, data.original]).double().numpy()
        y = np.concatenate([sub_label, np.ones(len(records), dtype=int)])
        val = np.concatenate([is_val, is_val])
        if len(set(y[~val])) < 2 or len(set(y[val])) < 2:
            raise InputError("both labels must occur in the training and the validation split; adjust tau")
        substituted_rows = np.arange(len(y)) < len(records)  # the mismatch rows, which C is chosen on
        best_c, scaler, model, by_c = _fit_choosing_c_on_training_prompts(x, y, ids * 2, ~val, substituted_rows,
                                                                          settings.seed)
        xs_val = scaler.transform(x[val])
        auc = roc_auc_score(y[val], model.decision_function(xs_val))
        hidden_weight, hidden_bias = fold_standardisation(model.coef_[0], model.intercept_[0], scaler.mean_,
                                                          scaler.scale_)
        fitted.x_sub = x[: len(records)]
        heads["hidden"] = _Head((HIDDEN,), hidden_weight, None, hidden_bias, best_c, by_c)
        fitted.hidden_model, fitted.xs_val, fitted.y_val = model, xs_val, y[val]
        fitted.best_c, fitted.auc = best_c, auc
    evidence = evidence_matrix(records)
    if settings.features not in ("auto", "hidden") and evidence is None:
        raise InputError(f"--features {settings.features} needs the logit features, which this run lacks: "
                         "label it again with this release (`selfjudge label` records them in the scores stage)")
    # The rows every head is compared on: validation mismatches with all logit features
    # (the feature after the last response token does not exist offline).
    complete = np.isfinite(evidence).all(1) if evidence is not None else np.ones(len(records), dtype=bool)
    fit_rows, eval_rows = ~is_val & complete, is_val & complete
    if evidence is not None and settings.features != "hidden" and len(set(sub_label[fit_rows])) == 2 \
            and len(set(sub_label[eval_rows])) == 2:
        heads["logits"] = _fit_scalar_head(evidence, sub_label, ids, fit_rows, settings.seed, LOGIT_FEATURES)
    if "hidden" in heads and "logits" in heads:
        stacked = np.column_stack([
            _out_of_fold_hidden_logits(x, y, ids, is_val, fitted.best_c, settings.seed,
                                       fitted.x_sub @ hidden_weight + hidden_bias),
            evidence])
        stack = _fit_scalar_head(stacked, sub_label, ids, fit_rows, settings.seed,
                                 ("stacked_hidden",) + LOGIT_FEATURES)
        heads["both"] = _Head((HIDDEN,) + LOGIT_FEATURES, stack.scalar[0] * hidden_weight, stack.scalar[1:],
                              stack.bias + stack.scalar[0] * hidden_bias, stack.C, stack.c_selection_roc_auc)
    if settings.features != "auto" and settings.features not in heads:
        raise InputError("the logit-feature heads need both labels among training and validation mismatches")
    fitted.heads, fitted.evidence, fitted.eval_rows = heads, evidence, eval_rows
    return fitted


def choose_head(fitted: FittedHeads, sub_label: np.ndarray, settings: TrainSettings) -> tuple[str, dict]:
    """The served head (auto: the best validation mismatch ROC-AUC) and every head's figures."""
    from sklearn.metrics import roc_auc_score

    labels = sub_label[fitted.eval_rows]
    both_outcomes = len(set(labels)) == 2
    comparison = {name: {"features": list(h.features), "C": h.C,
                         "C_selection_roc_auc": {str(c): auc for c, auc in h.c_selection_roc_auc.items()},
                         "validation_mismatch_roc_auc": float(
                             roc_auc_score(labels, h.logits(fitted.x_sub[fitted.eval_rows], fitted.evidence,
                                                            fitted.eval_rows)))
                         if both_outcomes else None}
                  for name, h in fitted.heads.items()}
    if settings.features != "auto":
        return settings.features, comparison
    if not both_outcomes:
        return "hidden", comparison
    return max(fitted.heads, key=lambda n: comparison[n]["validation_mismatch_roc_auc"] or 0.0), comparison


@dataclass
class ServingPoints:
    points: dict[str, OperatingPoint]
    default: float
    mismatch_p: np.ndarray  # the served head's P(accept) on the validation mismatches
    decision_labels: np.ndarray
    decision_p: np.ndarray
    decided_on: str


def serving_points(head: _Head, fitted: FittedHeads, sub_label: np.ndarray, data: TrainingData,
                   settings: TrainSettings) -> ServingPoints:
    """Named thresholds: youden/best_f1/recall on validation mismatches, accepted shares, and
    answer-change budgets where the runs have outcomes."""
    labels = sub_label[fitted.eval_rows]
    mismatch_p = _sigmoid(head.logits(fitted.x_sub[fitted.eval_rows], fitted.evidence, fitted.eval_rows))
    both_outcomes = len(set(labels)) == 2
    if both_outcomes:
        decision_labels, decision_p, decided_on = labels, mismatch_p, "validation mismatches"
    elif fitted.hidden_model is not None:  # tiny runs: every validation mismatch has one label
        decision_labels, decision_p = fitted.y_val, fitted.hidden_model.predict_proba(fitted.xs_val)[:, 1]
        decided_on = "all validation rows"
    else:
        raise InputError("both labels must occur among the validation mismatches; adjust tau")
    points = {
        name: point.model_copy(update={"metrics": {
            **point.metrics, "mismatch_accept_share": float((mismatch_p >= point.threshold).mean())}})
        for name, point in operating_points(decision_labels, decision_p, settings.recall_target, decided_on).items()
    }
    if both_outcomes:
        points.update(accept_share_points(labels, mismatch_p))
    if data.outcomes:
        eval_index = np.flatnonzero(fitted.eval_rows)
        changed = [data.outcomes.changed(data.records[k]) for k in eval_index]
        known = np.array([c is not None for c in changed], dtype=bool)
        if known.sum() >= 2:
            rows = eval_index[known]
            budget_points = answer_change_points(
                np.array([data.records[k]["id"] for k in rows]), np.array([data.records[k]["m"] for k in rows]),
                mismatch_p[known], np.array([c for c in changed if c is not None], dtype=bool))
            for name, point in budget_points.items():
                points[name] = point.model_copy(update={"metrics": {
                    **point.metrics, "mismatch_accept_share": float((mismatch_p >= point.threshold).mean())}})
    return ServingPoints(points, points["youden"].threshold, mismatch_p, decision_labels, decision_p, decided_on)


def per_proposer_metrics(records: list[dict], eval_rows: np.ndarray, labels: np.ndarray,
                         mismatch_p: np.ndarray, default: float) -> dict[str, dict]:
    """One head serves every proposer: its validation mismatches per proposer that drafted them."""
    from sklearn.metrics import roc_auc_score

    proposers = [proposers_of(records[k]) for k in np.flatnonzero(eval_rows)]
    out = {}
    for name in sorted({p for names in proposers for p in names}):
        mine = np.array([name in names for names in proposers])
        labels_here = labels[mine]
        out[name] = {
            "validation_mismatches": int(mine.sum()),
            "accept_label_share": float(labels_here.mean()),
            "roc_auc": float(roc_auc_score(labels_here, mismatch_p[mine])) if len(set(labels_here)) == 2 else None,
            "accept_share_at_default": float((mismatch_p[mine] >= default).mean()),
        }
    return out


def train(run_dirs: str | Path | list[str | Path], out_dir: str | Path, settings: TrainSettings) -> dict:
    """Train the judge on one or several label runs and write the artifact and its report."""
    from sklearn.metrics import precision_score, recall_score

    if sum([settings.tau is not None, settings.reject_share is not None, settings.tau_from_answers]) != 1:
        raise InputError("give exactly one of --tau, --reject-share or --tau-from-answers")
    if settings.features not in FEATURE_CHOICES:
        raise InputError(f"--features must be one of {', '.join(FEATURE_CHOICES)}")
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    # A logits-only head needs no hidden states: the run's scores stage is enough.
    with_hidden = settings.features != "logits"
    data = load_training_data(run_dirs, with_hidden, settings.allow_partial_run)
    records = data.records
    scores = label_scores(records, settings)
    ids = [r["id"] for r in records]
    is_val = split_by_prompt(ids, settings.validation_share, settings.seed)
    if not is_val.any() or is_val.all():
        raise InputError("need mismatches from at least two prompts to split train/validation")
    if settings.max_train_mismatches is not None:
        keep = limit_training(ids, is_val, settings.max_train_mismatches, settings.seed)
        data = data.subset(keep)
        records, scores, is_val = data.records, scores[keep], is_val[keep]
        ids = [r["id"] for r in records]
    tau, calibration = choose_tau(scores, is_val, data, settings)
    sub_label = (scores <= tau).astype(int)  # 1 = accept

    fitted = fit_heads(data, sub_label, is_val, settings, with_hidden)
    chosen, comparison = choose_head(fitted, sub_label, settings)
    head = fitted.heads[chosen]
    serving = serving_points(head, fitted, sub_label, data, settings)
    default, mismatch_labels = serving.default, sub_label[fitted.eval_rows]
    report = {
        "runs": [str(d) for d in run_dirs],
        "shards": data.shards,
        "hidden_state_precision": ", ".join(sorted({s["hidden_state_precision"] for s in data.shards}))
                                  if with_hidden else None,
        "mismatches": len(records),
        "training_mismatches": int((~is_val).sum()),
        "max_train_mismatches": settings.max_train_mismatches,
        "rows": int(len(records) * (2 if with_hidden else 1)),
        "tau": tau,
        "suffix_length": settings.suffix_length,
        "suffix_mode": settings.suffix_mode,
        "reject_labels": int((sub_label == 0).sum()),
        "reject_share_of_mismatches": float((sub_label == 0).mean()),
        "tau_calibration": calibration,
        "validation_prompts": len({i for i, v in zip(ids, is_val) if v}),
        "validation_share": settings.validation_share,  # with the seed: the prompt split, reproducible
        "seed": settings.seed,
        # The served head, and every feature set side by side on the same validation mismatches.
        "features": chosen,
        "feature_sets": comparison,
        # The hidden-state head (the paper's), on all validation rows.
        "C": fitted.best_c,
        "validation_roc_auc": None if fitted.auc is None else float(fitted.auc),
        "C_selection_share": C_SELECTION_SHARE,  # of the training prompts; each set's C_selection_roc_auc
        "validation_mismatches": int(fitted.eval_rows.sum()),
        "validation_mismatch_accept_label_share": float(mismatch_labels.mean()),
        "validation_mismatch_roc_auc": comparison[chosen]["validation_mismatch_roc_auc"],
        "per_proposer": per_proposer_metrics(records, fitted.eval_rows, mismatch_labels, serving.mismatch_p, default),
        "operating_points_on": serving.decided_on,
        "validation_precision_at_default": float(
            precision_score(serving.decision_labels, serving.decision_p >= default, zero_division=0)),
        "validation_recall_at_default": float(recall_score(serving.decision_labels, serving.decision_p >= default)),
        "validation_mismatch_accept_share_at_default": float((serving.mismatch_p >= default).mean()),
    }
    write_artifact(out_dir, head, data.target, serving, settings, report)
    return report


def label_prompt_digests(run_dirs: list[str]) -> list[str] | None:
    """The digests of every prompt the runs labelled (training and validation alike: both
    shaped the head and its operating points); None when a run predates recording them."""
    digests: set[str] = set()
    for run_dir in run_dirs:
        path = Path(run_dir) / PROMPT_DIGESTS_FILE
        if not path.is_file():
            return None
        digests |= set(json.loads(path.read_text()))
    return sorted(digests)


def write_artifact(out_dir: str | Path, head: _Head, target: dict, serving: ServingPoints, settings: TrainSettings,
                   report: dict) -> None:
    config = JudgeArtifactConfig(
        format_version=1 if head.features == (HIDDEN,) else 2,
        features=head.features,
        target=TargetIdentity(**target),
        default_threshold=serving.default,
        operating_points=serving.points,
        provenance=provenance({"runs": report["runs"], "seed": settings.seed, "report": report,
                               PROMPT_DIGESTS_KEY: label_prompt_digests(report["runs"])}),
    )
    JudgeArtifact(config, None if head.weight is None else torch.from_numpy(head.weight).float(),
                  torch.tensor([head.bias]),
                  None if head.scalar is None else torch.from_numpy(np.asarray(head.scalar)).float()).save(out_dir)
    (Path(out_dir) / "training_report.json").write_text(json.dumps(report, indent=2))
