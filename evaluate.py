"""Metrics, span decoding, evaluation of a checkpoint, and prediction on new posts.

    python evaluate.py --checkpoint outputs/run/checkpoints/best [--data_dir DIR] [--split test] [--output FILE]
    python evaluate.py --checkpoint outputs/run/checkpoints/best --predict posts.csv --output predictions.jsonl
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --checkpoint ...   # same numbers, two processes

Reading order: classification metrics -> the ReDSM5 paper's post x label metrics -> evidence as a set
of sentences -> SQuAD-style span metrics -> span candidates per window
(on the device) -> decoding per (criterion, post) pair across its windows -> `evaluate`, which
runs a model over a loader and returns metrics and predictions -> the command line.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import string
from pathlib import Path

import numpy as np
import torch

import data
from models import TASKS, featurize, load_checkpoint, post_encoding, resolve_checkpoint
from utils import UserError, _Parser, dataloader_kwargs, make_accelerator, run_main, setup_logging

log = logging.getLogger("redsm5")


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
            for c in data.SYMPTOMS if (criteria == c).any()}
    return out


# --------------------------------------------------------------------------- post-level metrics (the ReDSM5 paper)

NO_SYMPTOMS = "NO_SYMPTOMS"
PAPER_LABELS = data.SYMPTOMS + [NO_SYMPTOMS]  # the paper's ten labels: nine symptoms and "none of them"
THRESHOLD_GRID = np.round(np.arange(1, 20) * 0.05, 2)  # 0.05, 0.10, ..., 0.95


def has_post_pairs(cfg) -> bool:
    """Whether cfg's task predicts every (post, criterion) pair: criteria --unit post and joint."""
    return TASKS[cfg.task].classify and (cfg.task != "criteria" or cfg.unit == "post")


def post_label_matrix(examples, probs) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(post ids, gold posts x 10, probabilities posts x 9): (post, criterion) pair predictions folded into
    the paper's post x label matrix. Gold NO_SYMPTOMS (column 10) = the post has no positive symptom."""
    post_ids = list(dict.fromkeys(e["post_id"] for e in examples))
    row = {p: i for i, p in enumerate(post_ids)}
    gold = np.zeros((len(post_ids), len(PAPER_LABELS)), dtype=int)
    prob = np.full((len(post_ids), len(data.SYMPTOMS)), np.nan)
    for e, p in zip(examples, probs, strict=True):
        i, j = row[e["post_id"]], data.SYMPTOMS.index(e["criterion"])
        gold[i, j], prob[i, j] = e["label"], p
    missing = np.argwhere(np.isnan(prob))
    if len(missing):
        i, j = missing[0]
        raise ValueError(f"post {post_ids[i]} has no prediction for {data.SYMPTOMS[j]} (post x label matrix)")
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
    nine = classification_report(gold[:, :-1], pred[:, :-1], target_names=data.SYMPTOMS, output_dict=True,
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
    gold, probs = np.asarray(gold, dtype=int)[:, : len(data.SYMPTOMS)], np.asarray(probs, dtype=float)
    called = probs[None, :, :] >= THRESHOLD_GRID[:, None, None]  # (cut, post, symptom)
    tp = (called & (gold == 1)).sum(1)
    wrong = (called & (gold == 0)).sum(1) + (~called & (gold == 1)).sum(1)  # fp + fn
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)  # (cut, symptom); 0/0 -> 0 as sklearn
    out = np.empty(probs.shape[1])
    for j in range(probs.shape[1]):
        best = np.flatnonzero(f1[:, j] >= f1[:, j].max() - 1e-12)
        out[j] = max(THRESHOLD_GRID[best], key=lambda t: (-round(abs(t - 0.5), 6), t))  # 0.45 vs 0.55: 0.55
    return out


def post_level_metrics(examples, probs, thresholds: dict | None = None) -> dict:
    """The paper's metrics of pair probabilities at 0.5, and at per-symptom thresholds (`..._tuned`): tuned
    on these examples when `thresholds` is None (validation), applied when given ({symptom: threshold},
    test), left out when {} (a checkpoint saved without them). `paper_thresholds` says which were used."""
    _, gold, prob = post_label_matrix(examples, probs)
    at_half = paper_metrics(gold, prob)
    out = {k: v for k, v in at_half.items() if k != "per_symptom"} | {"paper_per_symptom": at_half["per_symptom"]}
    if thresholds is None:
        thresholds = {s: float(t) for s, t in zip(data.SYMPTOMS, tune_thresholds(gold, prob))}
    if thresholds:
        tuned = paper_metrics(gold, prob, [thresholds[s] for s in data.SYMPTOMS])
        out |= {f"{k}_tuned": v for k, v in tuned.items() if k != "per_symptom"}
        out |= {"paper_per_symptom_tuned": tuned["per_symptom"], "paper_thresholds": dict(thresholds)}
    return out


# --------------------------------------------------------------------------- evidence as a set of sentences

def sentences_of_spans(text: str, spans, sentences=None) -> list[int]:
    """Indices of the sentences of `text` (data.sentence_spans, or `sentences` if given) that char spans
    (start, end) cover by majority: a sentence is in when a span overlaps more than half of it, or more than
    half of the span when the span is the shorter (a phrase inside one sentence names that sentence)."""
    sentences = data.sentence_spans(text) if sentences is None else sentences
    out = set()
    for start, end in spans:
        for i, (s, e) in enumerate(sentences):
            overlap = min(end, e) - max(start, s)
            if overlap > 0 and 2 * overlap > min(e - s, end - start):
                out.add(i)
    return sorted(out)


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
            "sentence_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
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


# --------------------------------------------------------------------------- span decoding

def window_candidates(start_logits, end_logits, context_mask, max_answer_tokens: int, n_best: int) -> dict:
    """The n best (start, end) token pairs of each window: text tokens only, end >= start, bounded length.

    Runs on the device and returns fixed-size tensors, so that several processes can gather them.
    """
    neg = torch.finfo(start_logits.dtype).min / 4
    start = start_logits.masked_fill(~context_mask, neg)
    end = end_logits.masked_fill(~context_mask, neg)
    length, band = start.shape[1], min(max_answer_tokens, start.shape[1])
    # Only the band end - start in [0, band): ends[:, i, k] = end[:, i + k], past the window = neg.
    ends = torch.cat([end, end.new_full((len(end), band - 1), neg)], 1).unfold(1, band, 1)
    scores = start[:, :, None] + ends  # (windows, start, gap)
    top = scores.flatten(1).topk(min(n_best, length * band), dim=1)
    cand_start = top.indices // band
    return {"cand_start": cand_start, "cand_end": cand_start + top.indices % band, "cand_score": top.values,
            "null_score": start_logits[:, 0] + end_logits[:, 0],
            "has_context": context_mask.any(1)}


def decode_pairs(features: list[dict], outputs: dict, n_examples: int, texts: list[str]) -> list[dict]:
    """Best span of each (criterion, post) pair over all of its windows, cut from the post by char offsets.

    `outputs` holds per-window arrays (rows in any order, matched by feature_idx). The null score
    of a pair is its smallest window null score (SQuAD); the span score is the best candidate.
    """
    best = [{"span_score": -np.inf, "null_score": np.inf, "start": -1, "end": -1} for _ in range(n_examples)]
    valid = outputs["cand_score"] > np.finfo(np.float32).min / 8
    for row, fidx in enumerate(outputs["feature_idx"]):
        f = features[fidx]
        b = best[f["example_idx"]]
        b["null_score"] = min(b["null_score"], float(outputs["null_score"][row]))
        for k in np.flatnonzero(valid[row]):
            s, e = outputs["cand_start"][row, k], outputs["cand_end"][row, k]
            score = float(outputs["cand_score"][row, k])
            if score > b["span_score"]:
                b.update(span_score=score, start=int(f["offsets"][s, 0]), end=int(f["offsets"][e, 1]))
            break  # candidates are sorted: the first valid one is the window's best
    for b, text in zip(best, texts):
        b["text"] = text[b["start"] : b["end"]] if b["start"] >= 0 else ""
    return best


def tune_null_threshold(decoded: list[dict], golds: list[list[str]]) -> float:
    """Threshold on (null score - span score) above which the null answer wins; maximises mean F1."""
    diffs = np.array([d["null_score"] - d["span_score"] for d in decoded])
    f1_span = np.array([span_scores(d["text"], g)[1] for d, g in zip(decoded, golds)])
    f1_null = np.array([float(not g) for g in golds])
    best_t, best_f1 = np.inf, f1_span.mean()
    finite = np.unique(diffs[np.isfinite(diffs)])
    for t in np.concatenate([finite[:1] - 1.0, finite]):  # the first candidate: every pair null
        f1 = np.where(diffs > t, f1_null, f1_span).mean()
        if f1 > best_f1 + 1e-12:
            best_t, best_f1 = float(t), f1
    return best_t


# --------------------------------------------------------------------------- model outputs

@torch.inference_mode()
def model_outputs(model, loader, accelerator, cfg) -> dict[str, np.ndarray]:
    """Per-window outputs, gathered from every process exactly once (gather_for_metrics). Under `--encoding post`
    a row is a window and its arrays have a criteria axis after the row (see `pair_rows`)."""
    model.eval()
    parts = collections.defaultdict(list)
    for batch in loader:
        out = model(**batch)
        res = {"feature_idx": batch["feature_idx"]}
        if "cls_logits" in out:
            res["prob"] = out["cls_logits"].float().softmax(-1)[..., 1]
        if "tag_logits" in out:  # --evidence_head tag: the whole logits, one width for every batch
            tag = out["tag_logits"].float()
            res["tag_logits"] = torch.nn.functional.pad(tag, (0, cfg.max_length - tag.shape[-1]), value=-1e4)
        if "start_logits" in out:
            start, end = out["start_logits"].float(), out["end_logits"].float()
            mask = batch["context_mask"].unsqueeze(1).expand_as(start) if start.dim() == 3 else batch["context_mask"]
            found = window_candidates(start.flatten(0, -2), end.flatten(0, -2), mask.flatten(0, -2),
                                      cfg.max_answer_tokens, cfg.n_best)
            res.update({k: v.unflatten(0, start.shape[:-1]) for k, v in found.items()})
            room = cfg.max_length - start.shape[-1]  # the whole logits too, for sentence scores: one width
            res["start_logits"] = torch.nn.functional.pad(start, (0, room), value=-1e4)
            res["end_logits"] = torch.nn.functional.pad(end, (0, room), value=-1e4)
        for k, v in accelerator.gather_for_metrics(res).items():
            parts[k].append(v.cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def pair_rows(outputs: dict, features: list[dict]) -> tuple[dict, list[dict]]:
    """`--encoding post`: window rows with a criteria axis -> one row per (window, criterion) example, with
    features shaped like pair encoding's (example_idx, offsets): decoding and metrics are then the same code."""
    n, windows = len(data.SYMPTOMS), outputs["feature_idx"]
    example_idx = np.stack([features[w]["example_idxs"] for w in windows]).ravel()
    keep = example_idx >= 0
    rows = {k: v.reshape(len(windows) * n, *v.shape[2:])[keep] for k, v in outputs.items() if k != "feature_idx"}
    rows["feature_idx"] = np.arange(int(keep.sum()))
    pair_features = [{"example_idx": int(e), "offsets": features[w]["offsets"]}
                     for w, e in zip(np.repeat(windows, n)[keep], example_idx[keep])]
    return rows, pair_features


# --------------------------------------------------------------------------- evidence sets: decoding

def sentence_scores(features: list[dict], outputs: dict, texts: list[str], split: dict | None = None) -> list:
    """Per pair, a score for every sentence of its post, the max over the pair's windows (-inf for a sentence no
    window reads), for the set decoding and the ranking. A start/end head: the best start + end logits of a span
    inside the sentence (end >= start), less the window's null score. A tag head: the mean logit of its tokens."""
    split = split or {t: data.sentence_spans(t) for t in set(texts)}  # text -> its sentences' char spans
    sentences = {t: np.array(split[t], dtype=np.int64).reshape(-1, 2) for t in set(texts)}
    scores = [np.full(len(sentences[t]), -np.inf) for t in texts]
    for row, fidx in enumerate(outputs["feature_idx"]):
        f = features[fidx]
        offsets, sent = f["offsets"], sentences[texts[f["example_idx"]]]
        tokens = np.flatnonzero(offsets[:, 0] >= 0)
        of = (np.searchsorted(sent[:, 0], offsets[tokens, 0], side="right") - 1).clip(0)
        best = scores[f["example_idx"]]
        if "tag_logits" in outputs:
            tag = outputs["tag_logits"][row]
            for k in np.unique(of):
                best[k] = max(best[k], tag[tokens[of == k]].mean())
            continue
        start, end = outputs["start_logits"][row], outputs["end_logits"][row]
        for k in np.unique(of):
            toks = tokens[of == k]
            score = (np.maximum.accumulate(start[toks]) + end[toks]).max() - (start[0] + end[0])
            best[k] = max(best[k], score)
    return scores


def top_sentences(scores: list[np.ndarray], sets: list[set], texts: list[str], split: dict | None = None) -> list:
    """A tag head's single answer per pair: the best sentence of its decoded set ("" for an empty set)."""
    out = []
    for s, chosen, text in zip(scores, sets, texts):
        d = {"text": "", "start": -1, "end": -1, "span_score": float(s.max()) if len(s) else -np.inf,
             "null_score": 0.0}
        if chosen:
            a, b = (split[text] if split else data.sentence_spans(text))[max(chosen, key=lambda k: s[k])]
            d.update(text=text[a:b], start=a, end=b)
        out.append(d)
    return out


def tune_sentence_threshold(scores: list[np.ndarray], gold_sets: list, at_least_one: bool) -> float:
    """The score above which a sentence is predicted evidence, chosen (on validation) for the best sentence_f1 +
    set_exact_match of the decoded sets: micro F1 alone favours recall and adds a sentence to most pairs.
    Candidates: midpoints between up to 200 quantiles of the finite scores."""
    finite = np.concatenate([s[np.isfinite(s)] for s in scores] + [np.empty(0)])
    if not len(finite):
        return 0.0
    points = np.unique(np.quantile(finite, np.linspace(0, 1, 201)))
    candidates = np.concatenate([[points[0] - 1.0], (points[:-1] + points[1:]) / 2, [points[-1] + 1.0]])
    best, best_t = -1.0, 0.0
    for t in candidates:
        m = sentence_set_metrics(gold_sets, decode_sets(scores, float(t), at_least_one))
        if m["sentence_f1"] + m["set_exact_match"] > best + 1e-12:
            best, best_t = m["sentence_f1"] + m["set_exact_match"], float(t)
    return best_t


def decode_sets(scores: list[np.ndarray], threshold: float, at_least_one: bool) -> list[set[int]]:
    """The sentences scoring above `threshold`; with `at_least_one` (pairs known to have evidence) the best
    sentence when none does."""
    out = []
    for s in scores:
        chosen = set(np.flatnonzero(s > threshold).tolist())
        if not chosen and at_least_one and len(s) and np.isfinite(s.max()):
            chosen = {int(np.argmax(s))}
        out.append(chosen)
    return out


# --------------------------------------------------------------------------- evaluation

def score_classification(examples, features, out, cfg, thresholds: dict, tune: bool, predictions) -> dict:
    """Binary metrics of the pairs (a pair is as positive as its most positive window) and, where every
    (post, criterion) pair is an example, the paper's post-level metrics at 0.5 and at per-symptom thresholds
    (tuned here on validation; a checkpoint without them gets no tuned metrics, never thresholds tuned on test)."""
    prob = np.zeros(len(examples))
    np.maximum.at(prob, [features[i]["example_idx"] for i in out["feature_idx"]], out["prob"])
    for p, pr in zip(predictions, prob):
        p.update(prob=float(pr), pred=int(pr >= 0.5))
    metrics = classification_metrics([e["label"] for e in examples], prob, [e["criterion"] for e in examples])
    if has_post_pairs(cfg):
        metrics.update(post_level_metrics(examples, prob, None if tune else thresholds.get("paper_thresholds", {})))
        if tune:
            thresholds["paper_thresholds"] = metrics["paper_thresholds"]
    return metrics


def best_spans(examples, features, out, cfg, thresholds: dict, tune: bool) -> list[dict]:
    """The best span of every pair; evidence with negatives answers null where the null score beats the best span
    by more than the null threshold (tuned on validation)."""
    texts = [e["text"] for e in examples]
    golds = [[t[s:e] for s, e in ex["spans"]] for ex, t in zip(examples, texts)]
    decoded = decode_pairs(features, out, len(examples), texts)
    if TASKS[cfg.task].classify:  # joint: scored on the pairs with gold evidence, no null answers
        return decoded
    if tune:
        tuned = tune_null_threshold(decoded, golds) if cfg.include_negatives else math.inf
        thresholds["null_threshold"] = tuned if math.isfinite(tuned) else None  # None: never null (JSON)
    limit = math.inf if thresholds.get("null_threshold") is None else thresholds["null_threshold"]
    for d in decoded:
        if d["null_score"] - d["span_score"] > limit:
            d["text"], d["start"], d["end"] = "", -1, -1
    return decoded


def score_spans(examples, features, out, cfg, thresholds: dict, tune: bool, predictions) -> dict:
    """SQuAD-style metrics of the best span of each pair, and the sentence-set metrics of the set decoding
    (with those of the best span's sentences beside them, as single_span_*). joint scores its pairs with gold
    evidence; evidence with negatives may answer null."""
    texts = [e["text"] for e in examples]
    golds = [[t[s:e] for s, e in ex["spans"]] for ex, t in zip(examples, texts)]
    joint, nulls = TASKS[cfg.task].classify, not TASKS[cfg.task].classify and cfg.include_negatives
    scored = [i for i, g in enumerate(golds) if g] if joint else list(range(len(examples)))
    split = {t: data.sentence_spans(t) for t in set(texts)}  # once per post, not once per criterion
    scores = sentence_scores(features, out, texts, split)
    gold_sets = [sentences_of_spans(t, ex["spans"], split[t]) for ex, t in zip(examples, texts)]
    if tune:
        thresholds["sentence_threshold"] = tune_sentence_threshold([scores[i] for i in scored],
                                                                   [gold_sets[i] for i in scored], not nulls)
    pred_sets = decode_sets(scores, thresholds.get("sentence_threshold", 0.0), at_least_one=not nulls)
    if cfg.evidence_head == "span":
        decoded = best_spans(examples, features, out, cfg, thresholds, tune)
    else:
        decoded = top_sentences(scores, pred_sets, texts, split)
    metrics = span_metrics([decoded[i]["text"] for i in scored], [golds[i] for i in scored])
    if not joint and cfg.evidence_head == "span":
        metrics["null_threshold"] = thresholds["null_threshold"]
    single = [sentences_of_spans(t, [(d["start"], d["end"])] if d["start"] >= 0 else [], split[t])
              for d, t in zip(decoded, texts)]
    gold_scored = [gold_sets[i] for i in scored]
    metrics.update(sentence_set_metrics(gold_scored, [pred_sets[i] for i in scored]))
    metrics.update(ranking_metrics(gold_scored, [np.nan_to_num(scores[i], neginf=-1e30) for i in scored]))
    metrics.update({f"single_span_{k}": v for k, v in sentence_set_metrics(gold_scored, [single[i] for i in scored])
                    .items() if k in ("sentence_f1", "set_exact_match")})
    several = [i for i in scored if len(gold_sets[i]) >= 2]  # the pairs one span cannot hold
    for name, sets in (("multi", pred_sets), ("multi_single_span", single)) if several else ():
        m = sentence_set_metrics([gold_sets[i] for i in several], [sets[i] for i in several])
        metrics.update({f"{name}_{k}": m[k] for k in ("sentence_f1", "set_exact_match")})
    metrics["n_multi_sentence_pairs"] = len(several)
    metrics["sentence_threshold"] = thresholds["sentence_threshold"]
    for p, d, g, gs, chosen, t in zip(predictions, decoded, golds, gold_sets, pred_sets, texts):
        spans = [split[t][k] for k in sorted(chosen)]
        p.update(pred_text=d["text"], pred_start=d["start"], pred_end=d["end"], span_score=d["span_score"],
                 null_score=d["null_score"], gold_texts=g, gold_sentences=gs, pred_sentences=sorted(chosen),
                 pred_sentence_spans=[list(s) for s in spans], pred_sentence_texts=[t[a:b] for a, b in spans])
    return metrics


def evaluate(model, loader, features, examples, cfg, accelerator, thresholds: dict | None = None):
    """(metrics, predictions, thresholds) of `model` on one split. `thresholds` (null answer, evidence
    sentences, per-symptom post-level thresholds), as tuned on validation, are applied; None tunes them here."""
    task, tune = TASKS[cfg.task], thresholds is None
    thresholds = dict(thresholds or {})
    out = model_outputs(model, loader, accelerator, cfg)
    if post_encoding(cfg):
        out, features = pair_rows(out, features)
    predictions = [{"post_id": e["post_id"], "criterion": e["criterion"], "label": e["label"],
                    **({"sentence_id": e["sentence_id"]} if "sentence_id" in e else {})} for e in examples]
    metrics = {}
    if task.classify:
        metrics.update(score_classification(examples, features, out, cfg, thresholds, tune, predictions))
    if task.spans:  # a span head's n-best candidates, or a tag head's logits
        metrics.update(score_spans(examples, features, out, cfg, thresholds, tune, predictions))
    if task.classify and task.spans:
        metrics["combined"] = (metrics["f1_macro"] + metrics["span_f1"]) / 2
    return metrics, predictions, thresholds


def metric_names(cfg) -> list[str]:
    """The numbers `evaluate` reports on a split for cfg's task: what --early_stopping_metric can watch.
    Read off the metric functions themselves (on two made-up examples), so the list cannot drift from them."""
    task, metrics = TASKS[cfg.task], {}
    if task.classify:
        metrics.update(classification_metrics([0, 1], [0.2, 0.8]))
    if has_post_pairs(cfg):
        made_up = [{"post_id": "p", "criterion": s, "label": 0} for s in data.SYMPTOMS]
        metrics.update(post_level_metrics(made_up, [0.2] * len(made_up)))
    if task.spans:
        nulls = not task.classify and cfg.include_negatives  # evidence with negatives: also the null-answer scores
        metrics.update(span_metrics(["a", ""], [["a"], []] if nulls else [["a"], ["b"]]))
        metrics.update(sentence_set_metrics([[0]], [[0]]), **ranking_metrics([[0]], [np.zeros(2)]),
                       single_span_sentence_f1=0.0, single_span_set_exact_match=0.0, sentence_threshold=0.0,
                       **{f"{p}_{k}": 0.0 for p in ("multi", "multi_single_span")
                          for k in ("sentence_f1", "set_exact_match")})
    if task.classify and task.spans:
        metrics["combined"] = 0.0
    return [k for k, v in metrics.items() if isinstance(v, float)]


def format_metrics(metrics: dict) -> str:
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    lines = [f"  {k:<24} {metrics[k]:.4f}" for k in keys]
    if "confusion_matrix" in metrics:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        lines.append(f"  confusion matrix         tn {tn}  fp {fp}  fn {fn}  tp {tp}")
    for c, f1 in metrics.get("per_criterion_f1", {}).items():
        lines.append(f"  f1 {c:<21} {f1:.4f}")
    return "\n".join(lines)


def json_safe(obj):
    """`obj` with every non-finite float (NaN, inf) replaced by None, recursively, and numpy scalars and
    arrays made plain: json.dumps(json_safe(x), allow_nan=False) is then strict JSON (NaN is not JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON: NaN and inf are written as null."""
    return json.dumps(json_safe(obj), allow_nan=False, default=float, **kwargs)


def write_jsonl(rows, path):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(dumps(r) + "\n")


def check_writable(path: str | Path, flag: str = "--output") -> Path:
    """Refuse an output path that cannot be written before any work is done: its folder must exist and be
    writable, and the path must not be a folder."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory (give a file name)")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable")
    return path


# --------------------------------------------------------------------------- command line

def main(argv=None):
    parser = _Parser(prog="evaluate.py", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/best folder of a run")
    parser.add_argument("--data_dir", help="ReDSM5 folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "test_shift"],
                        help="test_shift: the shifted corpus of the run (demo held-out phrasing or test_shift_dir)")
    parser.add_argument("--predict", metavar="POSTS_CSV", help="predict on new posts (post_id,text) instead")
    parser.add_argument("--output", help="where to write the metrics JSON (or the predictions JSONL)")
    parser.add_argument("--batch_size", type=int, help="evaluation batch size (default: the run's)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size: must be >= 1, got {args.batch_size}")
    output = args.output or ("predictions.jsonl" if args.predict else None)
    if output is not None:
        check_writable(output)  # before the model is loaded and run, not after
    accelerator = make_accelerator()
    setup_logging(accelerator.is_main_process)
    posts = read_posts(Path(args.predict)) if args.predict else None  # a bad file fails before the model loads
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, tokenizer, cfg, extra = load_checkpoint(checkpoint)
    if args.batch_size is not None:
        cfg.eval_batch_size = args.batch_size
    task = TASKS[cfg.task]
    if args.predict:
        predictions = predict_posts(model, tokenizer, cfg, extra, posts, accelerator)
        if accelerator.is_main_process:
            write_jsonl(predictions, output)
            log.info("wrote %d predictions to %s", len(predictions), output)
        return
    corpus, post_ids = split_posts_of(cfg, checkpoint, args.split, args.data_dir)
    examples = task.examples(corpus, post_ids, cfg)
    if not examples:
        raise UserError(f"split '{args.split}' has no examples for task {cfg.task}")
    features = featurize(cfg, tokenizer, examples)
    loader = data.make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id,
                              **dataloader_kwargs(cfg, accelerator.device.type == "cuda"))
    model, loader = accelerator.prepare(model, loader)
    metrics, predictions, _ = evaluate(model, loader, features, examples, cfg, accelerator, saved_thresholds(extra))
    if accelerator.is_main_process:
        log.info("%s on %s (%d examples, %d processes):\n%s", cfg.task, args.split, len(examples),
                 accelerator.num_processes, format_metrics(metrics))
        if args.output:
            Path(args.output).write_text(dumps({args.split: metrics}, indent=2))


def saved_thresholds(extra: dict) -> dict:
    """The thresholds tuned on validation, from a checkpoint's checkpoint.json."""
    return dict(extra.get("thresholds") or {})


def split_posts_of(cfg, checkpoint: Path, split: str, data_dir=None) -> tuple:
    """(corpus, post ids) of a split of the run: from its saved splits.json, or test_shift: every post of
    its shifted corpus (--data_dir then names that corpus)."""
    if split == "test_shift":
        shift_cfg = cfg if data_dir is None else dataclasses.replace(cfg, test_shift_dir=data_dir)
        corpus = data.load_shift_corpus(shift_cfg)
        if corpus is None:
            raise UserError("--split test_shift: this run has no shifted test set (no test_shift_dir, and not the "
                            "demo with demo_shift_posts > 0); give it as --data_dir")
        log.info("\n%s", data.format_report(corpus.report))
        return corpus, sorted(corpus.posts)
    corpus = data.load_corpus_from_config(cfg, data_dir if data_dir is not None else cfg.data_dir)
    log.info("\n%s", data.format_report(corpus.report))
    return corpus, data.load_splits(checkpoint / "splits.json", corpus)[split]


def record_lines(path: Path) -> list[int]:
    """The line on which each record (blank lines skipped) of a CSV that data.read_csv accepted starts, header first."""
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader, lines, start = csv.reader(io.StringIO(text, newline="")), [], 1
    for fields in reader:
        if fields:
            lines.append(start)
        start = reader.line_num + 1
    return lines


def read_posts(path: Path) -> dict[str, str]:
    """post_id -> text of a --predict CSV. No rows, or a post_id twice (its predictions could not be told
    apart), is an error naming the file; rows without post_id or text are skipped with a warning."""
    rows, _ = data.read_csv(path, data.POST_COLUMNS)
    if not rows:
        raise UserError(f"{path}: no posts (a header and no rows)")
    posts, first_row = {}, {}
    for i, r in enumerate(rows):
        pid = r["post_id"].strip()
        if not pid:
            continue
        if pid in first_row:
            lines = record_lines(path)[1:]
            raise UserError(f"{path}: post_id '{pid}' on line {lines[first_row[pid]]} and again on line {lines[i]} "
                            "(predictions are keyed by post_id: give each post its own)")
        first_row[pid] = i
        if r["text"].strip():
            posts[pid] = r["text"]
    if not posts:
        raise UserError(f"{path}: no row has both a post_id and a text")
    if len(posts) < len(rows):
        log.warning("%s: %d rows without post_id or text skipped", path, len(rows) - len(posts))
    return posts


def predict_posts(model, tokenizer, cfg, extra, posts_csv, accelerator) -> list[dict]:
    """Per post and criterion: probability (criteria, joint) and evidence span (evidence, joint).

    A sentence-unit criteria model scores each sentence of the post; the post's probability is
    its most positive sentence, which is also returned as the evidence. `posts_csv`: a CSV path or read_posts' dict.
    """
    posts = posts_csv if isinstance(posts_csv, dict) else read_posts(Path(posts_csv))
    sentence_unit = cfg.task == "criteria" and cfg.unit == "sentence"
    examples = []
    for pid, text in posts.items():
        for symptom in data.SYMPTOMS:
            if sentence_unit:
                examples += [{"post_id": pid, "criterion": symptom, "text": text[s:e], "label": 0, "spans": [],
                              "char_span": (s, e)} for s, e in data.sentence_spans(text)]
            else:
                examples.append({"post_id": pid, "criterion": symptom, "text": text, "label": 0, "spans": []})
    features = featurize(cfg, tokenizer, examples)
    loader = data.make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id)
    model, loader = accelerator.prepare(model, loader)
    _, preds, _ = evaluate(model, loader, features, examples, cfg, accelerator, saved_thresholds(extra))
    out, tuned = {}, saved_thresholds(extra).get("paper_thresholds") or {}
    for ex, p in zip(examples, preds):
        key = (ex["post_id"], ex["criterion"])
        row = {"post_id": ex["post_id"], "criterion": ex["criterion"]}
        if sentence_unit:
            if key not in out or p["prob"] > out[key]["prob"]:
                s, e = ex["char_span"]
                out[key] = {**row, "prob": p["prob"], "pred": p["pred"], "evidence_text": ex["text"],
                            "evidence_start": s, "evidence_end": e}
            continue
        for k in ("prob", "pred"):
            if k in p:
                row[k] = p[k]
        if "prob" in p and tuned:  # at the symptom's threshold chosen on validation (post-level tasks)
            row["pred_tuned"] = int(p["prob"] >= tuned[ex["criterion"]])
        if "pred_text" in p:
            row.update(evidence_text=p["pred_text"], evidence_start=p["pred_start"], evidence_end=p["pred_end"],
                       span_score=p["span_score"], null_score=p["null_score"],
                       evidence_sentences=p["pred_sentence_spans"], evidence_sentence_texts=p["pred_sentence_texts"])
        out[key] = row
    return list(out.values())


if __name__ == "__main__":
    run_main(main)
