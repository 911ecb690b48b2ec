"""Pure metric functions, on numpy and scikit-learn only (`import metrics` does not import torch).

Reading order: classification metrics -> the ReDSM5 paper's post x label metrics -> evidence as a set of
sentences and the ranking of a post's sentences -> SQuAD-style span metrics -> the one threshold tuner
that every threshold chosen on validation goes through (`best_threshold`).
"""
from __future__ import annotations

import collections
import re
import string

import numpy as np

from data import SYMPTOMS

# --------------------------------------------------------------------------- classification

def classification_metrics(labels, probs, criteria=None, threshold: float = 0.5) -> dict:
    """Binary metrics for the positive class (status 1 / has evidence); values are fractions."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    preds = (probs >= threshold).astype(int)
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, average="binary", zero_division=0)
    out = {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(p), "recall": float(r), "f1": float(f1),
        "f1_macro": float(f1_score(labels, preds, average="macro", labels=[0, 1], zero_division=0)),
        "auroc": float(roc_auc_score(labels, probs)) if len(set(labels.tolist())) == 2 else float("nan"),
        "confusion_matrix": confusion_matrix(labels, preds, labels=[0, 1]).tolist(),  # [[tn, fp], [fn, tp]]
        "n": int(len(labels)),
    }
    if criteria is not None:
        criteria = np.asarray(criteria)
        out["per_criterion_f1"] = {
            c: float(f1_score(labels[criteria == c], preds[criteria == c], zero_division=0))
            for c in SYMPTOMS if (criteria == c).any()}
    return out


# --------------------------------------------------------------------------- post-level metrics (the ReDSM5 paper)

NO_SYMPTOMS = "NO_SYMPTOMS"


PAPER_LABELS = SYMPTOMS + [NO_SYMPTOMS]  # the paper's ten labels: nine symptoms and "none of them"


THRESHOLD_GRID = np.round(np.arange(1, 20) * 0.05, 2)  # 0.05, 0.10, ..., 0.95


def post_label_matrix(examples, probs) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(post ids, gold posts x 10, probabilities posts x 9): (post, criterion) pair predictions folded into
    the paper's post x label matrix. Gold NO_SYMPTOMS (column 10) = the post has no positive symptom."""
    post_ids = list(dict.fromkeys(e["post_id"] for e in examples))
    row = {p: i for i, p in enumerate(post_ids)}
    gold = np.zeros((len(post_ids), len(PAPER_LABELS)), dtype=int)
    prob = np.full((len(post_ids), len(SYMPTOMS)), np.nan)
    for e, p in zip(examples, probs, strict=True):
        i, j = row[e["post_id"]], SYMPTOMS.index(e["criterion"])
        gold[i, j], prob[i, j] = e["label"], p
    missing = np.argwhere(np.isnan(prob))
    if len(missing):
        i, j = missing[0]
        raise ValueError(f"post {post_ids[i]} has no prediction for {SYMPTOMS[j]} (post x label matrix)")
    gold[:, -1] = gold[:, :-1].max(axis=1) == 0
    return post_ids, gold, prob


def predict_labels(probs, thresholds=0.5) -> np.ndarray:
    """posts x 10 predictions: a symptom where its probability >= its threshold, NO_SYMPTOMS where none is.
    The paper's models have a tenth output for NO_SYMPTOMS (sigmoid > 0.5, independent of the other nine;
    eliseobao/redsm5 examples/*.ipynb); ours have none, so it is derived: predicted exactly when no symptom
    is. >= as everywhere in our code (the notebooks use >; the two differ only at a probability of exactly 0.5)."""
    symptoms = np.asarray(probs, dtype=float) >= np.asarray(thresholds, dtype=float)
    return np.column_stack([symptoms, ~symptoms.any(axis=1)]).astype(int)


def paper_metrics(gold, probs, thresholds=0.5) -> dict:
    """The paper's numbers: scikit-learn's classification_report (zero_division=0) of the post x label matrix.
    paper_micro_f1 / paper_macro_f1 over the ten labels (what the paper reports), ..._9 over the nine symptoms
    alone, and per_symptom {label: {precision, recall, f1, support}} of all ten."""
    from sklearn.metrics import classification_report

    gold, pred = np.asarray(gold, dtype=int), predict_labels(probs, thresholds)
    report = classification_report(gold, pred, target_names=PAPER_LABELS, output_dict=True, zero_division=0)
    nine = classification_report(gold[:, :-1], pred[:, :-1], target_names=SYMPTOMS, output_dict=True,
                                 zero_division=0)
    return {"paper_micro_f1": float(report["micro avg"]["f1-score"]),
            "paper_macro_f1": float(report["macro avg"]["f1-score"]),
            "paper_micro_f1_9": float(nine["micro avg"]["f1-score"]),
            "paper_macro_f1_9": float(nine["macro avg"]["f1-score"]),
            "per_symptom": {label: {"precision": float(report[label]["precision"]),
                                    "recall": float(report[label]["recall"]),
                                    "f1": float(report[label]["f1-score"]), "support": int(report[label]["support"])}
                            for label in PAPER_LABELS}}


def tune_thresholds(gold, probs) -> np.ndarray:
    """Per symptom, the threshold of THRESHOLD_GRID (0.05..0.95) with that symptom's best F1 on these
    (validation) posts; ties go to the threshold closest to 0.5, then to the higher one, so a symptom
    that validation cannot tell apart (no positives, or every cut equal) keeps 0.5. A fixed grid, not every
    observed probability: a cut between two validation posts would fit them, not the symptom. NO_SYMPTOMS
    has no threshold of its own (it follows the nine), so it is not tuned."""
    gold, probs = np.asarray(gold, dtype=int)[:, : len(SYMPTOMS)], np.asarray(probs, dtype=float)
    called = probs[None, :, :] >= THRESHOLD_GRID[:, None, None]  # (cut, post, symptom)
    tp = (called & (gold == 1)).sum(1)
    f1 = f1_from_counts(tp, (called & (gold == 0)).sum(1), (~called & (gold == 1)).sum(1))  # (cut, symptom)
    preferred = sorted(range(len(THRESHOLD_GRID)), key=lambda i: (round(abs(THRESHOLD_GRID[i] - 0.5), 6),
                                                                  -THRESHOLD_GRID[i]))  # 0.5, 0.55, 0.45, ...
    return np.array([best_threshold(THRESHOLD_GRID[preferred], f1[preferred, j]) for j in range(probs.shape[1])])


def post_level_metrics(examples, probs, thresholds: dict | None = None) -> dict:
    """The paper's metrics of pair probabilities at 0.5, and at per-symptom thresholds (`..._tuned`): tuned
    on these examples when `thresholds` is None (validation), applied when given ({symptom: threshold},
    test), left out when {} (a checkpoint saved without them). `paper_thresholds` says which were used."""
    _, gold, prob = post_label_matrix(examples, probs)
    at_half = paper_metrics(gold, prob)
    out = {k: v for k, v in at_half.items() if k != "per_symptom"} | {"paper_per_symptom": at_half["per_symptom"]}
    if thresholds is None:
        thresholds = {s: float(t) for s, t in zip(SYMPTOMS, tune_thresholds(gold, prob))}
    if thresholds:
        tuned = paper_metrics(gold, prob, [thresholds[s] for s in SYMPTOMS])
        out |= {f"{k}_tuned": v for k, v in tuned.items() if k != "per_symptom"}
        out |= {"paper_per_symptom_tuned": tuned["per_symptom"], "paper_thresholds": dict(thresholds)}
    return out


# --------------------------------------------------------------------------- evidence as a set of sentences

def sentence_set_metrics(gold_sets, pred_sets) -> dict:
    """Predicted evidence sentences against gold, per (post, criterion) pair.

    sentence_precision / _recall / _f1: micro over all (pair, sentence) decisions, so a pair with five gold
    sentences weighs five times a pair with one (as scikit-learn's micro average; 0 where nothing is
    predicted or gold). sentence_f1_macro: the mean of the pairs' F1, a pair with no gold and no predicted
    sentence scoring 1 (SQuAD's null answer). set_exact_match: the fraction of pairs whose set is exactly
    the gold set, both empty included."""
    tp = fp = fn = 0
    pair_f1, exact = [], []
    for gold, pred in zip(gold_sets, pred_sets, strict=True):
        gold, pred = set(gold), set(pred)
        hit = len(gold & pred)
        tp, fp, fn = tp + hit, fp + len(pred) - hit, fn + len(gold) - hit
        pair_f1.append(2 * hit / (len(gold) + len(pred)) if gold or pred else 1.0)
        exact.append(gold == pred)
    return {"sentence_precision": tp / (tp + fp) if tp + fp else 0.0,
            "sentence_recall": tp / (tp + fn) if tp + fn else 0.0,
            "sentence_f1": float(f1_from_counts(tp, fp, fn)),
            "sentence_f1_macro": float(np.mean(pair_f1)) if pair_f1 else 0.0,
            "set_exact_match": float(np.mean(exact)) if exact else 0.0}


def ranking_metrics(gold_sets, sentence_scores) -> dict:
    """The ranking of each pair's post sentences by score (eRisk / DepreSym style), over the pairs with at
    least one gold sentence: sentence_map = mean average precision (scikit-learn's average_precision_score),
    r_precision = mean precision of the top R sentences, R = the pair's number of gold sentences (ties in
    score broken by sentence order). NaN when no pair has gold evidence."""
    from sklearn.metrics import average_precision_score

    ap, rp = [], []
    for gold, scores in zip(gold_sets, sentence_scores, strict=True):
        if not gold:
            continue
        scores = np.asarray(scores, dtype=float)
        if max(gold) >= len(scores):
            raise ValueError(f"gold sentence {max(gold)} of a post with {len(scores)} scored sentences")
        truth = np.isin(np.arange(len(scores)), list(gold))
        ap.append(float(average_precision_score(truth, scores)))
        top = np.argsort(-scores, kind="stable")[: len(set(gold))]
        rp.append(float(truth[top].mean()))
    return {"sentence_map": float(np.mean(ap)) if ap else float("nan"),
            "r_precision": float(np.mean(rp)) if rp else float("nan"), "n_ranked_pairs": len(ap)}


# --------------------------------------------------------------------------- span metrics (SQuAD v2 rules)

def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def span_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # a null answer scores 1 only against a null gold
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def span_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, max over its gold answers; no gold = the null answer."""
    golds = golds or [""]
    em = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    return em, max(span_f1(prediction, g) for g in golds)


def span_metrics(predictions: list[str], golds: list[list[str]]) -> dict:
    """exact_match and span_f1 over all pairs; with null golds also has/no-answer accuracy."""
    scores = np.array([span_scores(p, g) for p, g in zip(predictions, golds)]).reshape(-1, 2)
    out = {"exact_match": float(scores[:, 0].mean()) if len(scores) else 0.0,
           "span_f1": float(scores[:, 1].mean()) if len(scores) else 0.0, "n_pairs": len(predictions)}
    has_answer = np.array([bool(g) for g in golds])
    if len(has_answer) and not has_answer.all():
        predicted_null = np.array([p == "" for p in predictions])
        out["null_accuracy"] = float((predicted_null != has_answer).mean())
        out["has_answer_exact_match"] = float(scores[has_answer, 0].mean()) if has_answer.any() else 0.0
        out["no_answer_accuracy"] = float(predicted_null[~has_answer].mean())
    return out


# --------------------------------------------------------------------------- F1 and thresholds

def f1_from_counts(tp, fp, fn):
    """F1 = 2tp / (2tp + fp + fn), 0 where tp is 0 (scikit-learn's zero_division=0); scalars or arrays."""
    tp, fp, fn = np.asarray(tp), np.asarray(fp), np.asarray(fn)
    return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)


def best_threshold(candidates, scores) -> float:
    """The candidate with the best score; scores within 1e-12 of the best tie, and a tie goes to the candidate
    that comes first. Every tuner passes its candidates in its own order of preference: the per-symptom
    thresholds closest to 0.5 first, the null-answer threshold "never null" first, the sentence threshold
    and baselines.py's decision threshold in the order their docstrings give."""
    scores = np.asarray(scores, dtype=float)
    return float(np.asarray(candidates, dtype=float)[np.flatnonzero(scores >= scores.max() - 1e-12)[0]])
