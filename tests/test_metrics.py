"""evaluate.py: hand-computed metrics, SQuAD-style span scoring, and span decoding across windows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import decoding
import metrics
from features import collate, featurize

# --------------------------------------------------------------------------- classification

# idx:       0     1     2     3     4     5     6     7     8     9
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PROBS = [0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1, 0.05, 0.35]
CRIT = ["DEPRESSED_MOOD", "DEPRESSED_MOOD", "ANHEDONIA", "ANHEDONIA", "DEPRESSED_MOOD",
        "DEPRESSED_MOOD", "ANHEDONIA", "ANHEDONIA", "ANHEDONIA", "DEPRESSED_MOOD"]


def test_classification_metrics_hand_computed():
    m = metrics.classification_metrics(LABELS, PROBS, CRIT)
    # preds at 0.5: 1 1 1 0 1 0 0 0 0 0 -> TP 3 (0,1,2), FN 1 (3), FP 1 (4), TN 5
    assert m["confusion_matrix"] == [[5, 1], [1, 3]]  # [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["precision"] == pytest.approx(3 / 4)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(3 / 4)  # TP / (TP + FN)
    assert m["f1"] == pytest.approx(3 / 4)
    # class 0: precision TN/(TN+FN) = 5/6, recall TN/(TN+FP) = 5/6, f1 5/6; macro = (3/4 + 5/6) / 2
    assert m["f1_macro"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    # AUROC = P(score of a positive > score of a negative): 0.9, 0.8, 0.7 beat all 6 negatives,
    # 0.3 beats 0.2, 0.1, 0.05 -> (6 + 6 + 6 + 3) / 24
    assert m["auroc"] == pytest.approx(21 / 24)
    # DEPRESSED_MOOD (0,1,4,5,9): labels 1 1 0 0 0, preds 1 1 1 0 0 -> P 2/3, R 1, F1 0.8
    # ANHEDONIA (2,3,6,7,8): labels 1 1 0 0 0, preds 1 0 0 0 0 -> P 1, R 1/2, F1 2/3
    assert m["per_criterion_f1"] == pytest.approx({"DEPRESSED_MOOD": 0.8, "ANHEDONIA": 2 / 3})
    assert m["n"] == 10
    for k in ("accuracy", "precision", "recall", "f1", "f1_macro", "auroc"):
        assert 0 <= m[k] <= 1 and isinstance(m[k], float)


def test_classification_metrics_threshold_and_one_class():
    m = metrics.classification_metrics(LABELS, PROBS, threshold=0.35)  # now 9 (0.35) is predicted positive too
    assert m["confusion_matrix"] == [[3, 3], [1, 3]] and "per_criterion_f1" not in m  # FP: 4, 5, 9
    assert m["auroc"] == pytest.approx(21 / 24)  # threshold-free
    m = metrics.classification_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert math.isnan(m["auroc"])  # undefined with one class, not a crash
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.0) / 2)  # class 0: P 1, R 2/3 -> 0.8; class 1: 0


# --------------------------------------------------------------------------- SQuAD-style span scores

def test_normalize_answer():
    assert metrics.normalize_answer("The  Cat's, a   HAT!") == "cats hat"
    assert metrics.normalize_answer("An apple\nand THE pear.") == "apple and pear"
    assert metrics.normalize_answer("theory anthem") == "theory anthem"  # articles only as whole words
    assert metrics.normalize_answer("  ...  ") == ""


def test_span_f1_and_scores():
    assert metrics.span_f1("the cat sat on the mat", "A cat sat on mat.") == 1.0
    assert metrics.span_f1("cat sat", "cat sat on mat") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert metrics.span_f1("the the cat cat", "cat") == pytest.approx(2 / 3)  # P 1/2 (counts clipped), R 1
    assert metrics.span_f1("dog", "cat") == 0.0
    assert metrics.span_f1("", "") == 1.0 and metrics.span_f1("", "cat") == 0.0 and metrics.span_f1("cat", "") == 0.0
    # max over gold answers, for EM and F1 separately
    assert metrics.span_scores("cat sat", ["dog ran", "cat sat on mat"]) == pytest.approx((0.0, 2 / 3))
    assert metrics.span_scores("Cat sat.", ["cat sat on mat", "the cat sat"]) == (1.0, 1.0)
    # no gold = the null answer
    assert metrics.span_scores("", []) == (1.0, 1.0)
    assert metrics.span_scores("anything", []) == (0.0, 0.0)
    assert metrics.span_scores("", ["cat"]) == (0.0, 0.0)


def test_span_metrics_with_null_answers():
    preds = ["cat sat", "", "dog", ""]
    golds = [["cat sat on mat"], [], [], ["bird"]]
    # per pair (EM, F1): (0, 2/3), (1, 1), (0, 0), (0, 0)
    m = metrics.span_metrics(preds, golds)
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["span_f1"] == pytest.approx((2 / 3 + 1) / 4)
    assert m["n_pairs"] == 4
    # null predicted [F, T, F, T] vs null gold [F, T, T, F]: right on pairs 0 and 1
    assert m["null_accuracy"] == pytest.approx(2 / 4)
    assert m["has_answer_exact_match"] == 0.0  # pairs 0 and 3
    assert m["no_answer_accuracy"] == pytest.approx(1 / 2)  # pairs 1 (null) and 2 ("dog")
    m = metrics.span_metrics(["cat sat"], [["cat sat", "a dog"]])
    assert m == {"exact_match": 1.0, "span_f1": 1.0, "n_pairs": 1}  # no null keys without null golds
    assert metrics.span_metrics([], [])["span_f1"] == 0.0


def test_tune_null_threshold():
    decoded = [  # diff = null - span: -4, 1, 3, 0.5
        {"text": "cat", "span_score": 5.0, "null_score": 1.0},  # gold "cat": keep the span
        {"text": "dog", "span_score": 2.0, "null_score": 3.0},  # no gold: null is right
        {"text": "x", "span_score": 1.0, "null_score": 4.0},  # no gold: null is right
        {"text": "bird", "span_score": 3.0, "null_score": 3.5},  # gold "bird": keep the span
    ]
    golds = [["cat"], [], [], ["bird"]]
    # mean F1 with null where diff > t: t=inf 0.5; t=3 0.5; t=1 0.75; t=0.5 1.0; t=-4 0.75
    assert decoding.tune_null_threshold(decoded, golds) == 0.5
    assert decoding.tune_null_threshold(decoded[:1] + decoded[3:], golds[:1] + golds[3:]) == math.inf  # never null


def test_tune_null_threshold_can_choose_all_null():
    decoded = [{"text": "a cat", "span_score": 2.0, "null_score": 1.0},
               {"text": "dog", "span_score": 1.0, "null_score": 3.0}]
    t = decoding.tune_null_threshold(decoded, [[], []])  # no pair has an answer: every span is wrong
    assert math.isfinite(t)  # stored in checkpoint.json; inf would mean "never null"
    assert all(d["null_score"] - d["span_score"] > t for d in decoded)


# --------------------------------------------------------------------------- candidates per window

def test_window_candidates_constraints():
    neg = -10.0
    start = torch.full((1, 8), neg)
    end = torch.full((1, 8), neg)
    context = torch.tensor([[False, False, False, True, True, True, True, False]])  # text tokens 3..6
    start[0, 1] = 50  # not a text token: never a start
    start[0, 3], start[0, 5] = 8, 9
    end[0, 4], end[0, 6] = 7, 5
    start[0, 0], end[0, 0] = 1, 2  # [CLS]: the null answer
    c = decoding.window_candidates(start, end, context, max_answer_tokens=3, n_best=3)
    # (5, 4) = 16 ends before it starts, (3, 6) = 13 is 4 tokens long, (1, 4) = 57 starts outside
    # the text: the best allowed are (3, 4) = 8 + 7, (5, 6) = 9 + 5, (5, 5) = 9 - 10
    assert list(zip(c["cand_start"][0].tolist(), c["cand_end"][0].tolist())) == [(3, 4), (5, 6), (5, 5)]
    assert c["cand_score"][0].tolist() == [15.0, 14.0, -1.0]
    assert c["null_score"].tolist() == [3.0] and c["has_context"].tolist() == [True]

    start[0, 3] = 12  # (3, 4) = 19 and (3, 6) = 17: a 4-token answer is allowed only with max_answer_tokens 4
    wide = decoding.window_candidates(start, end, context, max_answer_tokens=4, n_best=3)
    pairs = list(zip(wide["cand_start"][0].tolist(), wide["cand_end"][0].tolist()))
    assert pairs == [(3, 4), (3, 6), (5, 6)] and wide["cand_score"][0].tolist() == [19.0, 17.0, 14.0]
    narrow = decoding.window_candidates(start, end, context, max_answer_tokens=1, n_best=4)
    assert all(s == e for s, e in zip(narrow["cand_start"][0].tolist(), narrow["cand_end"][0].tolist()))


def test_window_candidates_equal_a_search_of_every_pair():
    gen = torch.Generator().manual_seed(0)
    start, end = torch.randn(6, 40, generator=gen), torch.randn(6, 40, generator=gen)
    context = torch.zeros(6, 40, dtype=torch.bool)
    context[:, 5:], context[2, 30:] = True, False  # a question, a shorter window
    c = decoding.window_candidates(start, end, context, max_answer_tokens=7, n_best=5)
    for w in range(6):
        text = context[w].nonzero().flatten().tolist()
        pairs = sorted(((float(start[w, i] + end[w, j]), i, j) for i in text for j in text if 0 <= j - i < 7),
                       reverse=True)
        assert list(zip(c["cand_start"][w].tolist(), c["cand_end"][w].tolist())) == [(i, j) for _, i, j in pairs[:5]]
        assert np.allclose(c["cand_score"][w].numpy(), [s for s, _, _ in pairs[:5]])


def test_window_candidates_without_text_tokens_are_invalid():
    start, end = torch.zeros(2, 5), torch.zeros(2, 5)
    context = torch.tensor([[False] * 5, [False, True, True, False, False]])
    c = decoding.window_candidates(start, end, context, max_answer_tokens=10, n_best=3)
    assert c["has_context"].tolist() == [False, True]
    invalid = np.finfo(np.float32).min / 8  # what decode_pairs treats as "no candidate"
    assert (c["cand_score"][0].numpy() < invalid).all() and (c["cand_score"][1].numpy() > invalid).all()
    for s, e in zip(c["cand_start"][1].tolist(), c["cand_end"][1].tolist()):
        assert 1 <= s <= e <= 2


# --------------------------------------------------------------------------- decoding through real windows

MAX_LENGTH, DOC_STRIDE = 128, 32
EVIDENCE = "I can’t sleep at night anymore and it’s ruining me."


def filler(n_sentences: int, offset: int = 0) -> str:
    return " ".join("My brother didn’t call, so I watched a film about ships instead." if i % 5 == 4
                    else f"On day {i + offset} we walked to the old store and bought {i % 9} green apples."
                    for i in range(n_sentences))


def gold_outputs(features, pad_id, high=None, n_best=5, max_answer_tokens=40, seed=0):
    """Window outputs of a perfect model: high logits at each window's start/end target, low elsewhere.

    `high(feature) -> float` sets the peak per window (default 10). Rows come back shuffled, as
    after a gather across processes, to check that decoding matches rows by feature_idx.
    """
    batch = collate(features, pad_id)
    n, width = batch["input_ids"].shape
    start, end = torch.full((n, width), -10.0), torch.full((n, width), -10.0)
    for i, f in enumerate(features):
        peak = high(f) if high else 10.0
        start[i, f["start"]], end[i, f["end"]] = peak, peak
    pad = batch["attention_mask"] == 0  # as TaskModel.forward does
    start, end = start.masked_fill(pad, -1e4), end.masked_fill(pad, -1e4)
    out = decoding.window_candidates(start, end, batch["context_mask"], max_answer_tokens, n_best)
    out = {k: v.numpy() for k, v in out.items()} | {"feature_idx": batch["feature_idx"].numpy()}
    perm = np.random.default_rng(seed).permutation(n)
    return {k: v[perm] for k, v in out.items()}


def check_window_targets(features, example, text):
    """Every window targets a gold span wholly inside it (decoding back to its text) or the null position 0."""
    golds = [text[s:e] for s, e in example["spans"]]
    hits = 0
    for f in features:
        ctx = np.flatnonzero(f["offsets"][:, 0] >= 0)
        lo, hi = f["offsets"][ctx[0], 0], f["offsets"][ctx[-1], 1]
        inside = [(s, e) for s, e in example["spans"] if lo <= s and e <= hi]
        assert len(f["input_ids"]) <= MAX_LENGTH
        if f["start"] == 0:
            assert f["end"] == 0 and not inside and f["label"] == (0 if example["spans"] else example["label"])
        else:
            hits += 1
            assert f["start"] in ctx and f["end"] in ctx and f["end"] >= f["start"] and f["label"] == 1
            target = text[f["offsets"][f["start"], 0]:f["offsets"][f["end"], 1]]
            assert target == golds[example["spans"].index(inside[0])]
    return hits


def test_span_at_the_end_of_a_7000_word_post_decodes_to_its_gold_text(tiny_tokenizer):
    text = filler(520) + " " + EVIDENCE  # 7,083 words; the evidence is the last sentence
    assert len(text.split()) > 7000
    start = text.index(EVIDENCE)
    example = {"post_id": "long", "criterion": "SLEEP_ISSUES", "text": text, "label": 1,
               "spans": [(start, start + len(EVIDENCE))]}
    features = featurize(tiny_tokenizer, [example], MAX_LENGTH, DOC_STRIDE, windows=True)
    assert len(features) > 50  # far past one window
    assert check_window_targets(features, example, text) >= 1
    assert features[-1]["start"] > 0  # the last window holds the evidence
    assert all(f["start"] == 0 for f in features[:-3])  # and windows far before it do not

    decoded = decoding.decode_pairs(features, gold_outputs(features, tiny_tokenizer.pad_token_id), 1, [text])
    assert decoded[0]["text"] == EVIDENCE
    assert (decoded[0]["start"], decoded[0]["end"]) == (start, len(text))
    assert decoded[0]["span_score"] == 20.0 and decoded[0]["null_score"] == -20.0  # min over windows
    assert metrics.span_scores(decoded[0]["text"], [text[s:e] for s, e in example["spans"]]) == (1.0, 1.0)


def test_multi_span_gold_each_window_targets_its_own_span(tiny_tokenizer):
    first = "Everything feels hopeless and I cry every day."
    second = "I feel empty and sad all the time."
    text = filler(3) + " " + first + " " + filler(60, offset=100) + " " + second + " " + filler(3, offset=300)
    spans = sorted((text.index(s), text.index(s) + len(s)) for s in (first, second))
    example = {"post_id": "multi", "criterion": "DEPRESSED_MOOD", "text": text, "label": 1, "spans": spans}
    features = featurize(tiny_tokenizer, [example], MAX_LENGTH, DOC_STRIDE, windows=True)
    targets = [text[f["offsets"][f["start"], 0]:f["offsets"][f["end"], 1]] for f in features if f["start"]]
    assert first in targets and second in targets  # both golds are targets, each in its own windows
    check_window_targets(features, example, text)

    # The decoder takes the best candidate over all windows: make the windows of `second` surer.
    def peak(f):
        return 12.0 if f["start"] and f["offsets"][f["start"], 0] == spans[1][0] else 10.0

    decoded = decoding.decode_pairs(features, gold_outputs(features, tiny_tokenizer.pad_token_id, peak), 1, [text])
    assert decoded[0]["text"] == second and decoded[0]["span_score"] == 24.0
    decoded = decoding.decode_pairs(features, gold_outputs(features, tiny_tokenizer.pad_token_id), 1, [text])
    assert decoded[0]["text"] in (first, second)
    assert metrics.span_scores(decoded[0]["text"], [first, second]) == (1.0, 1.0)  # max over golds


def test_two_spans_in_one_window_target_the_first(tiny_tokenizer):
    text = "I feel empty. Nothing matters. We ate pizza."
    example = {"post_id": "p", "criterion": "DEPRESSED_MOOD", "text": text, "label": 1, "spans": [(0, 13), (14, 30)]}
    (f,) = featurize(tiny_tokenizer, [example], MAX_LENGTH, DOC_STRIDE, windows=True)
    assert text[f["offsets"][f["start"], 0]:f["offsets"][f["end"], 1]] == "I feel empty."


def test_null_answers(tiny_tokenizer):
    text = filler(40) + " " + EVIDENCE + " " + filler(40, offset=50)
    start = text.index(EVIDENCE)
    positive = {"post_id": "a", "criterion": "SLEEP_ISSUES", "text": text, "label": 1,
                "spans": [(start, start + len(EVIDENCE))]}
    negative = {"post_id": "a", "criterion": "FATIGUE", "text": text, "label": 0, "spans": []}
    features = featurize(tiny_tokenizer, [positive, negative], MAX_LENGTH, DOC_STRIDE, windows=True)
    pos_f = [f for f in features if f["example_idx"] == 0]
    neg_f = [f for f in features if f["example_idx"] == 1]
    assert len(pos_f) > 3 and len(neg_f) > 3
    hits = check_window_targets(pos_f, positive, text)
    assert 1 <= hits < len(pos_f)  # windows without the span target position 0 (the null answer)
    assert all(f["start"] == f["end"] == 0 and f["label"] == 0 for f in neg_f)
    check_window_targets(neg_f, negative, text)

    decoded = decoding.decode_pairs(features, gold_outputs(features, tiny_tokenizer.pad_token_id), 2, [text, text])
    assert decoded[0]["text"] == EVIDENCE and decoded[0]["null_score"] == -20.0
    # negative pair: every window points at [CLS]; the best real span scores far below the null
    assert decoded[1]["null_score"] == 20.0 and decoded[1]["span_score"] == -20.0
    threshold = decoding.tune_null_threshold(decoded, [[EVIDENCE], []])
    diffs = [d["null_score"] - d["span_score"] for d in decoded]  # -40 (answer) and 40 (no answer)
    assert diffs[0] <= threshold < diffs[1]
