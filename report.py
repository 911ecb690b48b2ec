"""Cross-validation and multi-seed refits, summaries with bootstrap confidence intervals, baselines, plots.

    python report.py --task criteria --cv_folds 5 --seeds 1 2 3     # 5-fold CV x 3 seeds on the demo corpus
    python report.py --task criteria --cv_folds 1 --seeds 1 2 3     # refit on one train/val/test split, 3 seeds
    python report.py --task evidence --cv_folds 3 --epochs 2        # any train.py flag sets the base config
    python report.py --hpo_study criteria-coarse                    # plots of an Optuna study (hpo.py makes them too)
    python report.py --task joint --cv_folds 5 --resume true        # after a crash: finished runs are read back

Folds are by post and stratified by the post's symptom profile (`data.kfold_splits`): fold k is the
test set, a stratified slice of the other folds (val_ratio of all posts) the validation set, the rest
trains. Folds depend on --seed only, so --seeds vary the training (initialisation, batch order), not
the data. Each fold x seed is one `train.train` in output_dir/fold{k}-seed{s}/ and an MLflow run nested
under one parent run. output_dir then holds summary.json and summary.md: for every test metric the
mean, standard deviation, a percentile-bootstrap 95% interval of the mean over the runs (it treats
them as independent, a lower bound) and, with k >= 2 folds, the corrected resampled t interval that
allows for the training posts the runs share (Nadeau & Bengio 2003), the majority class,
a bag-of-words logistic regression and (span tasks) the first sentence of the post on the same folds,
and a per-criterion table; and PNGs of the confusion matrix, PR and ROC curves, training curves and
per-criterion scores (drawn by plots.py; also in each run's folder, and logged to MLflow). Where there is
a shifted test set (the demo's held-out phrasing, or --test_shift_dir), every run's model and every
fold's baselines are scored on it too: summary_test_shift in summary.json, a second table in summary.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np

import data
import train
from config import Config, load_yaml_config, parse_config
from evaluate import has_post_pairs
from hpo import DEFAULT_STORAGE, make_storage
from metrics import (
    classification_metrics,
    post_label_matrix,
    post_level_metrics,
    span_metrics,
    span_scores,
    tune_thresholds,
)
from models import TASKS
from plots import plot_confusion, plot_hpo, plot_per_criterion, plot_pr_roc, plot_training
from tracking import Tracker
from utils import UserError, run_main, setup_logging

log = logging.getLogger("redsm5")

# The ReDSM5 paper's baselines (its example notebooks, eliseobao/redsm5 examples/*.ipynb): micro / macro F1 of
# the post x label matrix, nine symptoms + NO_SYMPTOMS, threshold 0.5. Reference rows only: published, on the
# authors' own 80/20 split of the real corpus, not rerun here.
PUBLISHED_BASELINES = [
    ("TF-IDF + LinearSVC", 0.39, 0.28),
    ("1D CNN", 0.25, 0.19),
    ("bert-base-uncased (5 epochs, lr 2e-5, 512 tokens)", 0.51, 0.36),
    ("Llama-3.2-1B + classification head", 0.544, 0.489),
]
PUBLISHED_NOTE = "published, on the authors' own split, not rerun"


def add_report_flags(parser) -> None:
    group = parser.add_argument_group("report.py")
    group.add_argument("--cv_folds", type=int, default=5,
                       help="folds grouped by post; 1 = the one train/val/test split")
    group.add_argument("--seeds", type=int, nargs="+", help="training seeds of every fold (default: --seed)")
    group.add_argument("--n_bootstrap", type=int, default=10000, help="bootstrap resamples of the interval")
    group.add_argument("--hpo_study", help="only plot this Optuna study: history and parameter importances")
    group.add_argument("--storage", default=DEFAULT_STORAGE, help="--hpo_study: its storage URL (or journal:PATH)")


# --------------------------------------------------------------------------- statistics

def bootstrap_ci(values, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the values resampled with replacement n_boot times."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    means = values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def corrected_t_ci(values, test_train_ratio: float, level: float = 0.95) -> tuple[float | None, float | None]:
    """Corrected resampled t interval of the mean of cross-validation scores (Nadeau & Bengio 2003;
    Bouckaert & Frank 2004 for repeated folds): the runs' training sets overlap, so their scores are
    correlated, and the variance of the mean is (1/n + n_test/n_train) s^2, not s^2/n."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None, None  # no spread to scale
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * math.sqrt(
        (1 / len(values) + test_train_ratio) * values.var(ddof=1))
    return float(values.mean() - half), float(values.mean() + half)


def summarize(values, n_boot: int = 10000, test_train_ratio: float | None = None) -> dict:
    """mean, sample standard deviation and bootstrap 95% interval of the finite values; with
    `test_train_ratio` (cross-validation) also the corrected t interval."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0}
    low, high = bootstrap_ci(v, n_boot=n_boot)
    out = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
           "ci_low": low, "ci_high": high, "n": len(v)}
    if test_train_ratio is not None:
        out["ci_corrected_low"], out["ci_corrected_high"] = corrected_t_ci(v, test_train_ratio)
    return out


def summarize_runs(metrics: list[dict], n_boot: int = 10000, test_train_ratio: float | None = None) -> dict[str, dict]:
    """summarize() of every float metric (in first-seen order) over a list of metric dicts."""
    names = list(dict.fromkeys(k for m in metrics for k, v in m.items() if isinstance(v, float)))
    return {k: summarize([m.get(k) for m in metrics], n_boot, test_train_ratio) for k in names}


def choose_threshold(labels, probs) -> float:
    """Decision threshold with the best macro F1 on these (validation) labels, halfway between the lowest
    probability called positive and the next one below it; ties go to the higher threshold. Macro, not
    positive-class F1: where most examples are positive, that one is best at "everything positive"."""
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    if labels.all() or not labels.any():
        return 0.5
    cuts = np.unique(probs)[::-1]  # "positive if prob >= cut", strictest first
    called = probs[None, :] >= cuts[:, None]
    tp, tn = (called & (labels == 1)).sum(1), (~called & (labels == 0)).sum(1)
    f1_macro = tp / (called.sum(1) + labels.sum()) + tn / ((~called).sum(1) + (labels == 0).sum())  # (2tp/..+2tn/..)/2
    best = int(np.argmax(f1_macro))
    below = cuts[best + 1] if best + 1 < len(cuts) else 0.0
    return float((cuts[best] + below) / 2)


def criterion_table(rows: list[dict], classify: bool, spans: bool, gold_only: bool | None = None) -> dict[str, dict]:
    """Per criterion and over 'all': n, support (positives), precision, recall, F1 of each row's `pred`;
    exact match and span F1 of `pred_text` against `gold_texts` (`gold_only`, as joint does: only pairs with
    gold evidence; default: when classifying too)."""
    groups = {c: [r for r in rows if r["criterion"] == c] for c in data.SYMPTOMS}
    out = {}
    for name, group in [(c, g) for c, g in groups.items() if g] + [("all", rows)]:
        res = {"n": len(group)}
        if classify:
            y, p = np.array([r["label"] for r in group]), np.array([r["pred"] for r in group])
            tp = int(((y == 1) & (p == 1)).sum())
            res.update(support=int(y.sum()), precision=tp / max(int(p.sum()), 1), recall=tp / max(int(y.sum()), 1),
                       f1=2 * tp / max(int(y.sum() + p.sum()), 1))
        if spans:
            scored = [r for r in group if r["gold_texts"]] if (classify if gold_only is None else gold_only) else group
            s = np.array([span_scores(r["pred_text"], r["gold_texts"]) for r in scored]).reshape(-1, 2)
            res.update(pairs=len(scored), exact_match=float(s[:, 0].mean()) if len(s) else None,
                       span_f1=float(s[:, 1].mean()) if len(s) else None)
        out[name] = res
    return out


def mean_tables(tables: list[dict]) -> dict[str, dict]:
    """Criterion tables of several seeds averaged field by field; f1_std / span_f1_std over the seeds."""
    out = {}
    for c in tables[0]:
        rows = [t[c] for t in tables if c in t]
        out[c] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if rows[0][k] is not None}
        for k in ("f1", "span_f1"):
            if k in out[c]:
                out[c][k + "_std"] = float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
    return out


# --------------------------------------------------------------------------- folds and baselines

def fold_splits(corpus: data.Corpus, k: int, seed: int, val_ratio: float = 0.1,
                test_ratio: float = 0.1) -> list[dict[str, list[str]]]:
    """{train, val, test} post ids per fold: test = fold k, val = a stratified slice of the other folds.
    k = 1: the usual split_posts split (every seed refits on it)."""
    from sklearn.model_selection import train_test_split

    if k == 1:
        return [data.split_posts(corpus, seed, val_ratio, test_ratio)]
    if not 2 <= k <= len(corpus.posts) // 2:
        raise UserError(f"--cv_folds: must be 1 or between 2 and {len(corpus.posts) // 2} (posts / 2), got {k}")
    n_val = max(1, round(val_ratio * len(corpus.posts)))
    folds = []
    for rest, test in data.kfold_splits(corpus, k, seed):
        try:
            fit, val = train_test_split(rest, test_size=n_val, random_state=seed,
                                        stratify=data.post_strata(corpus, rest))
        except ValueError:  # too few posts per stratum (tiny corpora): an unstratified slice
            fit, val = train_test_split(rest, test_size=n_val, random_state=seed)
        folds.append({"train": sorted(fit), "val": sorted(val), "test": sorted(test)})
    return folds


def bow_tokens(example: dict) -> list[str]:
    """Words and word pairs of the text, each also crossed with the criterion, so that a linear model
    can weigh 'sleep' differently for SLEEP_ISSUES than for FATIGUE."""
    words = re.findall(r"[\w']+", example["text"].lower())
    grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    return grams + [f"{example['criterion']}|{g}" for g in grams] + [example["criterion"]]


def bow_probs(train_ex: list[dict], *others: list[dict]) -> list[np.ndarray]:
    """A tf-idf bag-of-words logistic regression fit on train_ex: P(label 1) for each list in `others`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(analyzer=bow_tokens, sublinear_tf=True)
    labels = [e["label"] for e in train_ex]
    if len(set(labels)) < 2:  # one class only: nothing to fit
        return [np.full(len(ex), float(labels[0]) if labels else 0.0) for ex in others]
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vectorizer.fit_transform(train_ex), labels)
    return [clf.predict_proba(vectorizer.transform(ex))[:, 1] if ex else np.zeros(0) for ex in others]


def first_sentence(text: str) -> str:
    spans = data.sentence_spans(text)
    return text[spans[0][0] : spans[0][1]] if spans else ""


def fold_baselines(corpus: data.Corpus, split: dict, cfg: Config, shift_ex: list[dict] | None = None) -> dict:
    """Test metrics (and test rows, for the per-criterion table) of the baselines on one fold; with `shift_ex`,
    their metrics on the shifted test set too ("shift_metrics"), fit and thresholded the same way."""
    task = TASKS[cfg.task]
    train_ex, val_ex, test_ex = (task.examples(corpus, split[s], cfg) for s in ("train", "val", "test"))
    out = {"metrics": {}, "rows": {}, "shift_metrics": {}}
    if task.classify:
        rate = float(np.mean([e["label"] for e in train_ex]))  # P(1) of every example: the majority class at 0.5
        val_p, test_p, shift_p = bow_probs(train_ex, val_ex, test_ex, shift_ex or [])
        threshold = choose_threshold([e["label"] for e in val_ex], val_p)
        paper = val_thresholds(val_ex, val_p) if has_post_pairs(cfg) else None
        for key, ex, probs in (("metrics", test_ex, test_p), ("shift_metrics", shift_ex, shift_p)):
            if not ex:
                continue
            labels, criteria = [e["label"] for e in ex], [e["criterion"] for e in ex]
            out[key]["majority class"] = classification_metrics(labels, np.full(len(ex), rate), criteria)
            out[key]["bag-of-words LR"] = {**classification_metrics(labels, probs, criteria),
                                           **with_threshold(labels, probs, threshold)}
            if paper is not None:  # the paper's post x label matrix, scored as the model's is
                out[key]["majority class"].update(post_level_metrics(ex, np.full(len(ex), rate), {}))
                out[key]["bag-of-words LR"].update(post_level_metrics(ex, probs, paper))
        out["rows"]["bag-of-words LR"] = [{**e, "prob": p, "pred": int(p >= threshold)}
                                          for e, p in zip(test_ex, test_p)]
    if task.spans:
        for key, ex in (("metrics", test_ex), ("shift_metrics", shift_ex)):
            if ex:
                out[key]["first sentence"], rows = first_sentence_baseline(ex, task.classify)
                if key == "metrics":
                    out["rows"]["first sentence"] = rows
    return out


def val_thresholds(val_ex: list[dict], val_p) -> dict:
    """Per-symptom thresholds tuned on the validation pairs, as train.py does for the model ({} without any)."""
    if not val_ex:
        return {}
    _, gold, probs = post_label_matrix(val_ex, val_p)
    return {s: float(t) for s, t in zip(data.SYMPTOMS, tune_thresholds(gold, probs))}


def first_sentence_baseline(examples: list[dict], classify: bool) -> tuple[dict, list[dict]]:
    """(span metrics, rows) of predicting the post's first sentence; pairs without gold are scored only
    where the task does not classify."""
    golds = [[e["text"][s:t] for s, t in e["spans"]] for e in examples]
    scored = [i for i, g in enumerate(golds) if g or not classify]
    preds = [first_sentence(e["text"]) for e in examples]
    metrics = span_metrics([preds[i] for i in scored], [golds[i] for i in scored])
    return metrics, [{**e, "pred_text": p, "gold_texts": g} for e, p, g in zip(examples, preds, golds)]


def with_threshold(labels, probs, threshold: float) -> dict:
    m = classification_metrics(labels, probs, threshold=threshold)
    return {"val_threshold": threshold, "f1_at_val_threshold": m["f1"], "f1_macro_at_val_threshold": m["f1_macro"],
            "precision_at_val_threshold": m["precision"], "recall_at_val_threshold": m["recall"]}


# --------------------------------------------------------------------------- cross-validation

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_artifacts(run_dir: Path, classify: bool) -> dict:
    """One finished run read back: scalar test metrics, test rows (with `pred` at the threshold chosen
    on validation), its training history and MLflow run id."""
    saved = json.loads((run_dir / "metrics.json").read_text())
    threshold = None
    if classify:
        val = read_jsonl(run_dir / "val_predictions.jsonl")
        threshold = choose_threshold([r["label"] for r in val], [r["prob"] for r in val])
    metrics, rows = scored_split(saved["test"], run_dir / "predictions.jsonl", threshold)
    shift = scored_split(saved["test_shift"], run_dir / "shift_predictions.jsonl", threshold)[0] \
        if saved.get("test_shift") else None
    run_stats = json.loads((run_dir / "run_stats.json").read_text())
    return {"metrics": metrics, "shift_metrics": shift, "rows": rows, "mlflow_run_id": run_stats.get("mlflow_run_id"),
            "history": json.loads((run_dir / "history.json").read_text())}


def scored_split(saved: dict, predictions: Path, threshold: float | None) -> tuple[dict, list[dict]]:
    """(scalar metrics, rows) of one scored split of a run; with a validation threshold (classifying), the
    metrics at it are added and each row gets its `pred`."""
    metrics, rows = {k: v for k, v in saved.items() if isinstance(v, float)}, read_jsonl(predictions)
    if threshold is not None:
        metrics.update(with_threshold([r["label"] for r in rows], [r["prob"] for r in rows], threshold))
        rows = [{**r, "pred": int(r["prob"] >= threshold)} for r in rows]
    return metrics, rows


def _curve(name: str, rows: list[dict], **style) -> tuple:
    return name, [r["label"] for r in rows], [r["prob"] for r in rows], style


def train_or_reuse(run_cfg: Config, resume: bool, parent_run_id: str | None = None) -> str:
    """Train one fold x seed. With --resume, a run that finished with this same config is read back
    as it is and one that stopped midway goes on from its last training state; a run of another
    config in that folder is an error, not silently mixed in. `parent_run_id`: the MLflow run it nests under."""
    run_dir = Path(run_cfg.output_dir)
    if resume and (run_dir / "config.yaml").exists():
        saved, now = load_yaml_config(run_dir / "config.yaml"), dataclasses.asdict(run_cfg)
        changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k != "resume" and saved.get(k) != now[k]]
        if changed:
            raise UserError(f"{run_dir}: trained with other settings ({', '.join(changed[:3])}): "
                            "give another --output_dir, or drop --resume")
        if all((run_dir / f).exists() for f in ("history.json", "metrics.json", "predictions.jsonl")):
            return "finished before, read back"  # history.json is written last
        if (run_dir / "checkpoints" / "last" / "COMPLETE").exists():
            train.train(dataclasses.replace(run_cfg, resume=True), parent_run_id=parent_run_id)
            return "resumed from its last state"
    train.train(run_cfg, parent_run_id=parent_run_id)
    return "trained"


def cross_validate(cfg: Config, k: int, seeds: list[int], n_boot: int, command: str) -> dict:
    """Train every fold x seed, then summarise (summary.json, summary.md, PNGs) into cfg.output_dir."""
    out_dir = Path(cfg.output_dir)
    (out_dir / "splits").mkdir(parents=True, exist_ok=True)
    corpus = data.load_corpus_from_config(cfg)
    folds = [data.load_splits(cfg.splits_file, corpus)] if k == 1 and cfg.splits_file else \
        fold_splits(corpus, k, cfg.seed, cfg.val_ratio, cfg.test_ratio)
    parent_cfg = dataclasses.replace(cfg, run_name=cfg.run_name or f"{cfg.task}-cv{k}x{len(seeds)}")
    with Tracker(parent_cfg, True) as parent:  # a run that raises ends the parent FAILED (KILLED on Ctrl-C)
        parent.log_params({"report.cv_folds": k, "report.seeds": " ".join(map(str, seeds))})
        shift = data.load_shift_corpus(cfg)  # one shifted test set, scored by every fold's model
        shift_ex = TASKS[cfg.task].examples(shift, sorted(shift.posts), cfg) if shift is not None else None
        runs, baselines = train_folds(cfg, corpus, folds, seeds, parent, shift_ex)
        result = summarize_cv(cfg, k, seeds, folds, runs, baselines, n_boot, command)
        pngs = summary_plots(result, runs, baselines, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
        (out_dir / "summary.md").write_text(summary_markdown(result, [p.name for p in pngs]))
        if parent.enabled:
            for prefix, summary in (("", result["summary"]), ("test_shift_", result.get("summary_test_shift"))):
                parent.log_metrics({f"{prefix}{m}_{s}": v for m, d in (summary or {}).get("model", {}).items()
                                    for s, v in d.items() if v is not None and s in (
                                        "mean", "std", "ci_low", "ci_high", "ci_corrected_low", "ci_corrected_high")},
                                   step=0)
            for path in [out_dir / "summary.json", out_dir / "summary.md", *pngs]:
                parent.log_artifact(path)
    log.info("wrote %s and %s", out_dir / "summary.md", out_dir / "summary.json")
    return result


def train_folds(cfg: Config, corpus: data.Corpus, folds: list[dict], seeds: list[int], parent: Tracker,
                shift_ex: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(runs, baselines): every fold x seed trained (or read back) in output_dir/fold{k}-seed{s}/ with its
    plots, the MLflow runs nested under `parent`; the baselines of every fold (also on `shift_ex`)."""
    out_dir, task = Path(cfg.output_dir), TASKS[cfg.task]
    runs, baselines = [], []
    for fold, split in enumerate(folds):
        (out_dir / "splits" / f"fold{fold}.json").write_text(json.dumps(split))
        baselines.append(fold_baselines(corpus, split, cfg, shift_ex))
        for seed in seeds:
            name = f"fold{fold}-seed{seed}"
            run_cfg = dataclasses.replace(cfg, seed=seed, splits_file=str(out_dir / "splits" / f"fold{fold}.json"),
                                          output_dir=str(out_dir / name), run_name=f"{cfg.task}-{name}", resume=False)
            log.info("=== %s: %d train / %d val / %d test posts", name, *map(len, split.values()))
            log.info("%s: %s", name, train_or_reuse(run_cfg, cfg.resume, parent.run_id))
            run = {"fold": fold, "seed": seed, "output_dir": run_cfg.output_dir,
                   **run_artifacts(out_dir / name, task.classify)}
            pngs = run_plots(cfg.task, name, run, baselines[-1], out_dir / name)
            if parent.enabled and run["mlflow_run_id"]:
                for png in pngs:
                    parent.client.log_artifact(run["mlflow_run_id"], str(png), "plots")
            runs.append(run)
    return runs, baselines


def run_plots(task: str, name: str, run: dict, fold_baseline: dict, run_dir: Path) -> list[Path]:
    """One run's PNGs in its folder: training curves; classifying, the confusion matrix at the validation
    threshold and PR/ROC curves beside the fold's bag-of-words baseline."""
    pngs = [plot_training({name: run["history"]}, run_dir / "training.png")]
    if TASKS[task].classify:
        threshold = run["metrics"]["val_threshold"]
        confusion = classification_metrics([r["label"] for r in run["rows"]],
                                           [r["pred"] for r in run["rows"]])["confusion_matrix"]
        pngs += [plot_confusion(confusion, run_dir / "confusion.png", f"{task} {name}: test fold\n"
                                f"(threshold {threshold:.2f}, chosen on validation)"),
                 plot_pr_roc([_curve("model", run["rows"], lw=1.5),
                              _curve("bag-of-words LR", fold_baseline["rows"]["bag-of-words LR"], lw=2, ls="--",
                                     color="black")],
                             run_dir / "pr_roc.png", f"{task} {name}: test fold")]
    return pngs


def summarize_cv(cfg, k, seeds, folds, runs, baselines, n_boot, command) -> dict:
    """What summary.json holds: the model over runs, baselines over folds, the per-criterion tables."""
    task = TASKS[cfg.task]
    # k folds: training sets overlap, so the corrected t interval too (test / train posts, mean over folds)
    ratio = float(np.mean([len(f["test"]) / len(f["train"]) for f in folds])) if k > 1 else None
    summary = {"model": summarize_runs([r["metrics"] for r in runs], n_boot, ratio)}
    for name in baselines[0]["metrics"]:
        summary[name] = summarize_runs([b["metrics"][name] for b in baselines], n_boot)
    shifted = None
    if all(r["shift_metrics"] for r in runs):  # the same shifted set for every run: still their training overlaps
        shifted = {"model": summarize_runs([r["shift_metrics"] for r in runs], n_boot, ratio)}
        for name in baselines[0]["shift_metrics"]:
            shifted[name] = summarize_runs([b["shift_metrics"][name] for b in baselines], n_boot)
    # per criterion: each seed's test rows pooled over the folds (every post scored once), then the mean over seeds
    by_seed = [[row for r in runs if r["seed"] == s for row in r["rows"]] for s in seeds]
    per_criterion = {"model": mean_tables([criterion_table(rows, task.classify, task.spans) for rows in by_seed])}
    for name in baselines[0]["rows"]:
        pooled = [row for b in baselines for row in b["rows"][name]]
        per_criterion[name] = criterion_table(pooled, "pred" in pooled[0], "pred_text" in pooled[0], task.classify)
    published = [{"name": n, "paper_micro_f1": mi, "paper_macro_f1": ma, "note": PUBLISHED_NOTE}
                 for n, mi, ma in PUBLISHED_BASELINES] if "paper_micro_f1" in summary["model"] else []
    return {"command": command, "task": cfg.task, "cv_folds": k, "seeds": seeds,
            "folds": [{s: len(f[s]) for s in ("train", "val", "test")} for f in folds],
            "runs": [{key: r[key] for key in ("fold", "seed", "output_dir", "metrics", "shift_metrics")} for r in runs],
            "summary": summary, **({"summary_test_shift": shifted} if shifted else {}), "per_criterion": per_criterion,
            "published": published}


def summary_plots(result: dict, runs: list[dict], baselines: list[dict], out_dir: Path) -> list[Path]:
    task, pc = result["task"], result["per_criterion"]
    pngs = [plot_training({f"fold{r['fold']}-seed{r['seed']}": r["history"] for r in runs}, out_dir / "training.png")]
    panels = []
    if TASKS[task].classify:
        cm = np.sum([classification_metrics([x["label"] for x in r["rows"]], [x["pred"] for x in r["rows"]])
                     ["confusion_matrix"] for r in runs], axis=0)
        pngs.append(plot_confusion(cm, out_dir / "confusion.png", f"{task}: test folds, summed over {len(runs)} runs"
                                   "\n(threshold chosen on validation per run)"))
        curves = [_curve(f"fold{r['fold']}-seed{r['seed']}", r["rows"], lw=1, alpha=0.8) for r in runs]
        bow = [row for b in baselines for row in b["rows"]["bag-of-words LR"]]
        curves.append(_curve("bag-of-words LR (all folds)", bow, lw=2, ls="--", color="black"))
        pngs.append(plot_pr_roc(curves, out_dir / "pr_roc.png", f"{task}: test folds ({int(cm.sum()):,} rows)"))
        panels.append(("F1 per criterion (mean over seeds)",
                       {n: {c: v["f1"] for c, v in pc[n].items()} for n in ("model", "bag-of-words LR")}))
    if TASKS[task].spans:
        panels.append(("span F1 per criterion (mean over seeds)",
                       {n: {c: v["span_f1"] for c, v in pc[n].items() if v.get("span_f1") is not None}
                        for n in ("model", "first sentence")}))
    return pngs + [plot_per_criterion(panels, out_dir / "per_criterion.png")]


# --------------------------------------------------------------------------- markdown

def _cell(d: dict | None, ci: bool = False, corrected: bool = False) -> str:
    if not d or d["mean"] is None:
        return "–"
    text = f"{d['mean']:.3f} ± {d['std']:.3f}"
    if ci:
        text += f" | [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
    if corrected:
        low, high = d.get("ci_corrected_low"), d.get("ci_corrected_high")
        text += f" | [{low:.3f}, {high:.3f}]" if low is not None else " | –"
    return text


def metric_table(summary: dict, corrected: bool) -> list[str]:
    """Markdown rows: every metric of the model (mean ± std, intervals) beside the baselines (mean ± std)."""
    baselines = [n for n in summary if n != "model"]
    lines = ["| metric | model | 95% CI | " + ("corrected 95% CI | " if corrected else "") + " | ".join(baselines)
             + " |", "|---|---|---|" + "---|" * (len(baselines) + corrected)]
    for metric, d in summary["model"].items():
        lines.append(f"| {metric} | {_cell(d, ci=True, corrected=corrected)} | "
                     + " | ".join(_cell(summary[b].get(metric)) for b in baselines) + " |")
    return lines


def summary_markdown(result: dict, pngs: list[str]) -> str:
    summary, k, seeds = result["summary"], result["cv_folds"], result["seeds"]
    design = f"{k}-fold cross-validation (grouped by post, stratified)" if k > 1 else "one train/val/test split"
    corrected = k > 1
    lines = [f"# {result['task']}: {design} x {len(seeds)} seed(s)", "", f"`{result['command']}`", "",
             f"{len(result['runs'])} runs (seeds {', '.join(map(str, seeds))}); posts per fold (train / val / test): "
             + ", ".join(f"{f['train']} / {f['val']} / {f['test']}" for f in result["folds"]) + ".", "",
             "Test metrics of each run's best checkpoint: mean ± standard deviation over the runs and a percentile "
             "bootstrap 95% interval of the mean" + (", which treats the runs as independent; they share training "
             "posts, so the corrected resampled t interval (Nadeau & Bengio 2003, variance (1/n + n_test/n_train) s², "
             "t with n - 1 degrees of freedom; unbounded, so it may pass 1 near the ceiling) is the one to quote."
             if corrected else ".")
             + (" Classification metrics at threshold 0.5 unless "
             "`_at_val_threshold` (chosen per run for the best macro F1 on its validation posts)."
             if "val_threshold" in summary["model"] else "") + " Baselines on the same test folds: mean ± std over "
             "the folds.", ""] + metric_table(summary, corrected)
    shifted = result.get("summary_test_shift")
    if shifted:
        lines += ["", "## Shifted test set (test_shift)", "",
                  "Every run's best checkpoint (thresholds from its own validation posts) and the baselines of every "
                  "fold on one separate corpus written with phrasing that no training post uses (the demo's held-out "
                  "phrase items, or `--test_shift_dir`). The set is the same for all runs, so the intervals are "
                  "over training variation only.", ""] + metric_table(shifted, corrected)
    thresholded = "val_threshold" in summary["model"]
    at_threshold = ", classified at each run's validation-chosen threshold" if thresholded else ""
    lines += ["", "## Per criterion", "",
              "Model: each seed's test predictions pooled over the folds (every post scored once per seed)"
              + at_threshold
              + "; the mean over seeds (± std over seeds). n = examples, support = positive examples, pairs = "
              "(criterion, post) pairs whose spans are scored.", ""]
    lines += criterion_markdown(result["per_criterion"])
    lines += paper_table(summary, result.get("published", []))
    lines += ["", "## Runs", "", "| run | " + " | ".join(list(summary["model"])[:6]) + " |",
              "|---|" + "---:|" * len(list(summary["model"])[:6])]
    for r in result["runs"]:
        lines.append(f"| fold{r['fold']}-seed{r['seed']} | " + " | ".join(
            f"{r['metrics'].get(m, float('nan')):.3f}" for m in list(summary["model"])[:6]) + " |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def criterion_markdown(pc: dict) -> list[str]:
    """The per-criterion table: the model's pooled test predictions beside the baselines'."""
    model = pc["model"]
    cls, spans = "f1" in model["all"], "span_f1" in model["all"]
    head, rule = ["criterion", "n"], ["---", "---:"]
    if cls:
        head += ["support", "precision", "recall", "F1", "bag-of-words LR F1"]
        rule += ["---:"] * 5
    if spans:
        head += ["pairs", "exact match", "span F1", "first-sentence span F1"]
        rule += ["---:"] * 4
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for c, m in model.items():
        cells = [c, f"{m['n']:.0f}"]
        if cls:
            bow = pc["bag-of-words LR"].get(c, {})
            cells += [f"{m['support']:.0f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}",
                      f"{m['f1']:.3f} ± {m['f1_std']:.3f}", f"{bow['f1']:.3f}" if bow else "–"]
        if spans:
            first = pc["first sentence"].get(c, {})
            cells += [f"{m['pairs']:.0f}", f"{m.get('exact_match', float('nan')):.3f}",
                      f"{m.get('span_f1', float('nan')):.3f} ± {m.get('span_f1_std', float('nan')):.3f}",
                      f"{first['span_f1']:.3f}" if first.get("span_f1") is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paper_table(summary: dict, published: list[dict]) -> list[str]:
    """Markdown lines: the ReDSM5 paper's numbers of the model and the baselines scored here, beside the
    published baselines as reference rows (their split, their corpus: not a like-for-like comparison)."""
    if "paper_micro_f1" not in summary["model"]:
        return []
    keys = ("paper_micro_f1", "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned")
    lines = ["", "## Compared with the ReDSM5 paper", "",
             "The paper's protocol: (post, criterion) predictions folded into the post x label matrix of the nine "
             "symptoms plus NO_SYMPTOMS (predicted where no symptom is), micro and macro F1 over the ten labels as "
             "scikit-learn's classification_report gives them, threshold 0.5; tuned = per-symptom thresholds "
             "chosen on each run's validation posts. Ours: mean ± std over runs (baselines: over folds). "
             "(f1_macro above is the two-class macro over pairs: not comparable.)", "",
             "| system | micro F1 | macro F1 | micro F1 (tuned) | macro F1 (tuned) | source |",
             "|---|---:|---:|---:|---:|---|"]
    for name, metrics in summary.items():
        source = "this report" if name == "model" else "this report, same test posts"
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(k)) for k in keys) + f" | {source} |")
    for p in published:
        lines.append(f"| {p['name']} | {p['paper_micro_f1']:.3f} | {p['paper_macro_f1']:.3f} | – | – | {p['note']} |")
    return lines


# --------------------------------------------------------------------------- command line

def hpo_plots(args, cfg: Config) -> list[Path]:
    import optuna

    try:
        study = optuna.load_study(study_name=args.hpo_study, storage=make_storage(args.storage))
    except KeyError:
        raise UserError(f"--hpo_study: no study '{args.hpo_study}' in {args.storage}") from None
    out = Path(cfg.output_dir) if cfg.output_dir != Config.output_dir else Path("outputs/hpo") / args.hpo_study
    paths = plot_hpo(study, out)
    log.info("wrote %s", ", ".join(map(str, paths)))
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, args = parse_config(argv, prog="report.py", extra=add_report_flags, doc=__doc__)
    setup_logging(True)
    if args.hpo_study:
        return hpo_plots(args, cfg)
    if args.cv_folds < 1:
        raise UserError(f"--cv_folds: must be >= 1, got {args.cv_folds}")
    if args.n_bootstrap < 100:
        raise UserError(f"--n_bootstrap: must be >= 100, got {args.n_bootstrap}")
    seeds = list(dict.fromkeys(args.seeds or [cfg.seed]))
    if cfg.output_dir == Config.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=f"outputs/report/{cfg.task}-cv{args.cv_folds}")
    return cross_validate(cfg, args.cv_folds, seeds, args.n_bootstrap, "python report.py " + " ".join(argv))


if __name__ == "__main__":
    run_main(main)
