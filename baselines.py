"""Baselines scored on the same folds as the models: majority class, bag of words, first sentence.

report.py fits them on each fold's training posts and scores them on its test posts (and on the shifted
test set) beside the fold's models:

- majority class: P(label 1) of the training examples for every example, so "1" or "0" for all at 0.5;
- bag-of-words LR: a tf-idf logistic regression over words and word pairs, each also crossed with the
  criterion (`bow_tokens`), at 0.5 and at the decision threshold chosen on the fold's validation posts;
- first sentence (span tasks): the post's first sentence as the evidence.

`choose_threshold` is that validation-chosen decision threshold; report.py scores every model run at it
too, so the baselines and the models are thresholded alike.
"""
from __future__ import annotations

import itertools
import re

import numpy as np

import alignment
import data
from config import Config
from metrics import (
    best_threshold,
    classification_metrics,
    f1_from_counts,
    post_label_matrix,
    post_level_metrics,
    span_metrics,
    tune_thresholds,
)
from models import TASKS
from scoring import has_post_pairs

# --------------------------------------------------------------------------- the decision threshold

def choose_threshold(labels, probs) -> float:
    """Decision threshold with the best macro F1 on these (validation) labels, halfway between the lowest
    probability called positive and the next one below it (0.0 below the lowest); ties go to the higher
    threshold. Macro, not positive-class F1: where most examples are positive, that one is best at
    "everything positive"."""
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    if labels.all() or not labels.any():
        return 0.5
    cuts = np.unique(probs)[::-1]  # "positive if prob >= cut", strictest first: ties go to the higher threshold
    called = probs[None, :] >= cuts[:, None]
    tp, fp = (called & (labels == 1)).sum(1), (called & (labels == 0)).sum(1)
    fn, tn = (~called & (labels == 1)).sum(1), (~called & (labels == 0)).sum(1)
    f1_macro = (f1_from_counts(tp, fp, fn) + f1_from_counts(tn, fn, fp)) / 2  # positive and negative class
    midpoints = (cuts + np.append(cuts[1:], 0.0)) / 2  # each cut's threshold: halfway to the next cut below
    return best_threshold(midpoints, f1_macro)


def with_threshold(labels, probs, threshold: float) -> dict:
    m = classification_metrics(labels, probs, threshold=threshold)
    return {"val_threshold": threshold, "f1_at_val_threshold": m["f1"], "f1_macro_at_val_threshold": m["f1_macro"],
            "precision_at_val_threshold": m["precision"], "recall_at_val_threshold": m["recall"]}


def val_thresholds(val_ex: list[dict], val_p) -> dict:
    """Per-symptom thresholds tuned on the validation pairs, as train.py does for the model ({} without any)."""
    if not val_ex:
        return {}
    _, gold, probs = post_label_matrix(val_ex, val_p)
    return {s: float(t) for s, t in zip(data.SYMPTOMS, tune_thresholds(gold, probs))}


# --------------------------------------------------------------------------- the baselines

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
    spans = alignment.sentence_spans(text)
    return text[spans[0][0] : spans[0][1]] if spans else ""


def first_sentence_baseline(examples: list[dict], classify: bool) -> tuple[dict, list[dict]]:
    """(span metrics, rows) of predicting the post's first sentence; pairs without gold are scored only
    where the task does not classify."""
    golds = [[e["text"][s:t] for s, t in e["spans"]] for e in examples]
    scored = [i for i, g in enumerate(golds) if g or not classify]
    preds = [first_sentence(e["text"]) for e in examples]
    metrics = span_metrics([preds[i] for i in scored], [golds[i] for i in scored])
    return metrics, [{**e, "pred_text": p, "gold_texts": g} for e, p, g in zip(examples, preds, golds)]


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

