"""Decoding model outputs into answers: the best spans of a (criterion, post) pair across its windows, and
evidence as a set of sentences, with the thresholds those decisions use (tuned on validation).

Reading order: span candidates per window (on the device) -> the best span per pair -> the null-answer
threshold -> post-encoding rows to pairs -> a score per sentence -> the sentence set and its threshold.
"""
from __future__ import annotations

import numpy as np
import torch

from alignment import sentence_spans
from data import SYMPTOMS
from metrics import best_threshold, sentence_set_metrics, span_scores


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
    finite = np.unique(diffs[np.isfinite(diffs)])
    # never null first (ties keep the spans), then every pair null, then each observed difference
    candidates = np.concatenate([[np.inf], finite[:1] - 1.0, finite])
    return best_threshold(candidates, [np.where(diffs > t, f1_null, f1_span).mean() for t in candidates])


def pair_rows(outputs: dict, features: list[dict]) -> tuple[dict, list[dict]]:
    """`--encoding post`: window rows with a criteria axis -> one row per (window, criterion) example, with
    features shaped like pair encoding's (example_idx, offsets): decoding and metrics are then the same code."""
    n, windows = len(SYMPTOMS), outputs["feature_idx"]
    example_idx = np.stack([features[w]["example_idxs"] for w in windows]).ravel()
    keep = example_idx >= 0
    rows = {k: v.reshape(len(windows) * n, *v.shape[2:])[keep] for k, v in outputs.items() if k != "feature_idx"}
    rows["feature_idx"] = np.arange(int(keep.sum()))
    pair_features = [{"example_idx": int(e), "offsets": features[w]["offsets"]}
                     for w, e in zip(np.repeat(windows, n)[keep], example_idx[keep])]
    return rows, pair_features


# --------------------------------------------------------------------------- evidence sets

def sentences_of_spans(text: str, spans, sentences=None) -> list[int]:
    """Indices of the sentences of `text` (sentence_spans, or `sentences` if given) that char spans
    (start, end) cover by majority: a sentence is in when a span overlaps more than half of it, or more than
    half of the span when the span is the shorter (a phrase inside one sentence names that sentence)."""
    sentences = sentence_spans(text) if sentences is None else sentences
    out = set()
    for start, end in spans:
        for i, (s, e) in enumerate(sentences):
            overlap = min(end, e) - max(start, s)
            if overlap > 0 and 2 * overlap > min(e - s, end - start):
                out.add(i)
    return sorted(out)


def sentence_scores(features: list[dict], outputs: dict, texts: list[str], split: dict | None = None) -> list:
    """Per pair, a score for every sentence of its post, the max over the pair's windows (-inf for a sentence no
    window reads), for the set decoding and the ranking. A start/end head: the best start + end logits of a span
    inside the sentence (end >= start), less the window's null score. A tag head: the mean logit of its tokens."""
    split = split or {t: sentence_spans(t) for t in set(texts)}  # text -> its sentences' char spans
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
            a, b = (split[text] if split else sentence_spans(text))[max(chosen, key=lambda k: s[k])]
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
    decoded = [sentence_set_metrics(gold_sets, decode_sets(scores, float(t), at_least_one)) for t in candidates]
    return best_threshold(candidates, [m["sentence_f1"] + m["set_exact_match"] for m in decoded])  # lowest first


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
