"""evaluate.py: the ReDSM5 paper's post x label metrics and evidence as a set of sentences, hand-computed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import classification_report, f1_score

import alignment
import data
import decoding
import metrics
import scoring
from config import Config

DM, ANH, APP = 0, 1, 2  # columns of DEPRESSED_MOOD, ANHEDONIA, APPETITE_CHANGE; NO_SYMPTOMS is column 9
NO = 9


def hand_matrix():
    """4 posts; only three symptoms occur, the other six columns are gold 0 with probability 0.1.
    p1 gold {DM, ANH}, pred {DM}; p2 gold {DM}, pred {DM, ANH}; p3 gold {} pred {} (NO_SYMPTOMS right);
    p4 gold {APP}, pred {} (so NO_SYMPTOMS is predicted, wrongly)."""
    gold = np.zeros((4, 10), dtype=int)
    gold[0, [DM, ANH]] = 1
    gold[1, DM] = 1
    gold[2, NO] = 1
    gold[3, APP] = 1
    probs = np.full((4, 9), 0.1)
    probs[0, [DM, ANH, APP]] = 0.9, 0.4, 0.2
    probs[1, [DM, ANH, APP]] = 0.6, 0.7, 0.1
    probs[2, [DM, ANH, APP]] = 0.3, 0.2, 0.45
    probs[3, [DM, ANH, APP]] = 0.2, 0.1, 0.3
    return gold, probs


def test_paper_metrics_hand_computed_with_no_symptoms():
    gold, probs = hand_matrix()
    pred = metrics.predict_labels(probs)
    assert pred[:, [DM, ANH, APP, NO]].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    m = metrics.paper_metrics(gold, probs)
    # DM: tp 2 (p1, p2) -> P 1, R 1, F1 1. ANH: fp p2, fn p1 -> F1 0. APP: fn p4, nothing predicted -> P 0
    # (zero_division), F1 0. NO_SYMPTOMS: tp p3, fp p4 -> P 1/2, R 1, F1 2/3. Six labels with support 0: F1 0.
    assert m["per_symptom"]["DEPRESSED_MOOD"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert m["per_symptom"]["ANHEDONIA"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_symptom"]["APPETITE_CHANGE"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_symptom"]["NO_SYMPTOMS"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3,
                                                             "support": 1})
    assert m["per_symptom"]["FATIGUE"]["support"] == 0 and list(m["per_symptom"]) == metrics.PAPER_LABELS
    # micro over ten: tp 2+0+0+1 = 3, fp 0+1+0+1 = 2, fn 0+1+1+0 = 2 -> 2*3 / (6+2+2) = 3/5
    assert m["paper_micro_f1"] == pytest.approx(3 / 5)
    # macro over ten: (1 + 0 + 0 + 2/3 + 6 * 0) / 10 = 1/6
    assert m["paper_macro_f1"] == pytest.approx(1 / 6)
    # the nine alone: tp 2, fp 1, fn 2 -> 4/7; macro 1/9
    assert m["paper_micro_f1_9"] == pytest.approx(4 / 7)
    assert m["paper_macro_f1_9"] == pytest.approx(1 / 9)
    # what the paper's notebooks print: classification_report of the same matrices
    report = classification_report(gold, pred, target_names=metrics.PAPER_LABELS, output_dict=True, zero_division=0)
    assert m["paper_micro_f1"] == pytest.approx(report["micro avg"]["f1-score"])
    assert m["paper_macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    assert m["paper_macro_f1_9"] == pytest.approx(f1_score(gold[:, :9], pred[:, :9], average="macro", zero_division=0))


def test_per_symptom_thresholds_apply_and_no_symptoms_follows():
    gold, probs = hand_matrix()
    thresholds = [0.5] * 9
    thresholds[ANH], thresholds[APP] = 0.8, 0.25  # ANH never called (0.7 < 0.8); APP on p3 (0.45) and p4 (0.3)
    pred = metrics.predict_labels(probs, thresholds)
    assert pred[:, [DM, ANH, APP, NO]].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    m = metrics.paper_metrics(gold, probs, thresholds)
    # DM F1 1; ANH fn p1 -> 0; APP tp p4, fp p3 -> P 1/2, R 1, F1 2/3; NO_SYMPTOMS fn p3 (APP called) -> 0.
    # micro: tp 2+0+1+0 = 3, fp 0+0+1+0 = 1, fn 0+1+0+1 = 2 -> 6 / (6+1+2) = 2/3; macro (1 + 2/3) / 10 = 1/6
    assert m["per_symptom"]["APPETITE_CHANGE"]["f1"] == pytest.approx(2 / 3)
    assert m["per_symptom"]["NO_SYMPTOMS"]["f1"] == 0.0
    assert m["paper_micro_f1"] == pytest.approx(2 / 3) and m["paper_macro_f1"] == pytest.approx(1 / 6)


def test_post_label_matrix_folds_pairs():
    examples, probs = [], []
    for pid, positives in (("b", {"FATIGUE"}), ("a", set())):  # post order: first seen
        for j, s in enumerate(data.SYMPTOMS):
            examples.append({"post_id": pid, "criterion": s, "label": int(s in positives)})
            probs.append(j / 10 + (0.05 if pid == "a" else 0.0))
    order = [8, 0, 17, 3, 12, 1, 2, 4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 16]  # pairs in any order
    post_ids, gold, prob = metrics.post_label_matrix([examples[i] for i in order], [probs[i] for i in order])
    assert post_ids == ["b", "a"]
    fatigue = data.SYMPTOMS.index("FATIGUE")
    assert gold[0].tolist() == [int(j == fatigue) for j in range(10)]  # b: FATIGUE, so not NO_SYMPTOMS
    assert gold[1].tolist() == [0] * 9 + [1]  # a: no positive symptom -> NO_SYMPTOMS
    assert prob[0].tolist() == pytest.approx([j / 10 for j in range(9)])
    assert prob[1].tolist() == pytest.approx([j / 10 + 0.05 for j in range(9)])
    with pytest.raises(ValueError, match="post a has no prediction for SUICIDAL_THOUGHTS"):
        metrics.post_label_matrix(examples[:-1], probs[:-1])


def test_tune_thresholds_hand_example():
    gold = np.zeros((6, 10), dtype=int)
    probs = np.full((6, 9), 0.01)
    # DM: gold 1 1 0 0 at 0.9 0.32 0.22 0.1. F1 by cut: <= 0.1: tp 2 fp 2 -> 2/3; 0.15-0.2: fp 1 -> 4/5;
    # 0.25-0.3: 1.0; 0.35-0.9: tp 1 fn 1 -> 2/3; 0.95: 0. Best 0.25 and 0.30: the closer to 0.5 is 0.30.
    gold[:4, DM] = 1, 1, 0, 0
    probs[:4, DM] = 0.9, 0.32, 0.22, 0.1
    # ANH: no gold positive, F1 0 at every cut -> keeps 0.5.
    probs[:, ANH] = 0.6
    # APP: gold 1 at 0.9 0.9 0.47 0.02, gold 0 at 0.52 0.52. Cuts 0.05-0.45: tp 3 fp 2 fn 1 -> 6/9;
    # 0.5: tp 2 fp 2 fn 2 -> 1/2; 0.55-0.9: tp 2 fn 2 -> 4/6 = 6/9. Tie at 0.45 and 0.55: the higher.
    gold[:, APP] = 1, 1, 0, 0, 1, 1
    probs[:, APP] = 0.9, 0.9, 0.52, 0.52, 0.47, 0.02
    gold[:, NO] = gold[:, :9].max(1) == 0
    t = metrics.tune_thresholds(gold, probs)
    assert t[DM] == pytest.approx(0.30) and t[ANH] == 0.5 and t[APP] == pytest.approx(0.55)
    assert t[3:].tolist() == [0.5] * 6  # no positives anywhere


def test_post_level_metrics_tunes_applies_or_leaves_out():
    examples = [{"post_id": p, "criterion": s, "label": int(p == "x" and s == "FATIGUE")}
                for p in ("x", "y") for s in data.SYMPTOMS]
    probs = [0.3 if e["label"] else 0.1 for e in examples]  # FATIGUE of x is below 0.5 but above y's
    tuned = metrics.post_level_metrics(examples, probs)  # validation: tuned here
    assert tuned["paper_thresholds"]["FATIGUE"] == pytest.approx(0.3)  # 0.15-0.3 all give F1 1; 0.3 is closest
    assert tuned["paper_per_symptom"]["FATIGUE"]["f1"] == 0.0 and tuned["paper_per_symptom_tuned"]["FATIGUE"]["f1"] == 1
    # at 0.5 nothing is called: NO_SYMPTOMS right on y, wrong on x -> micro 2*1/(2+1+1) = 1/2; tuned: both right
    assert tuned["paper_micro_f1"] == pytest.approx(1 / 2) and tuned["paper_micro_f1_tuned"] == 1.0
    applied = metrics.post_level_metrics(examples, probs, {s: 0.05 for s in data.SYMPTOMS})  # test: applied
    assert applied["paper_thresholds"] == {s: 0.05 for s in data.SYMPTOMS}
    assert applied["paper_per_symptom_tuned"]["FATIGUE"]["precision"] == pytest.approx(1 / 2)  # y called too
    left_out = metrics.post_level_metrics(examples, probs, {})  # none known: no tuned numbers
    assert "paper_micro_f1_tuned" not in left_out and "paper_thresholds" not in left_out
    assert left_out["paper_macro_f1"] == tuned["paper_macro_f1"]


def test_metric_names_hold_the_paper_and_sentence_metrics():
    for cfg in (Config(task="criteria", unit="post"), Config(task="joint")):
        names = scoring.metric_names(cfg)
        assert {"paper_micro_f1", "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned"} <= set(names)
    assert "paper_micro_f1" not in scoring.metric_names(Config(task="criteria"))  # sentence unit: no posts
    assert {"sentence_f1", "set_exact_match"} <= set(scoring.metric_names(Config(task="evidence")))
    assert "sentence_f1" in scoring.metric_names(Config(task="joint"))


# --------------------------------------------------------------------------- evidence as a set of sentences

TEXT = "I slept badly. We ate pizza. I am always tired.\nThe end."


def test_sentences_of_spans():
    spans = alignment.sentence_spans(TEXT)
    assert [TEXT[s:e] for s, e in spans] == ["I slept badly.", "We ate pizza.", "I am always tired.", "The end."]
    gold = [spans[0], spans[2]]  # a two-sentence gold, as data.align_sentence gives it
    assert decoding.sentences_of_spans(TEXT, gold) == [0, 2]
    assert decoding.sentences_of_spans(TEXT, [(spans[0][0], spans[2][1])]) == [0, 1, 2]  # one span, filler included
    phrase = TEXT.index("always tired")
    assert decoding.sentences_of_spans(TEXT, [(phrase, phrase + 12)]) == [2]  # a phrase names its sentence
    into_next = (TEXT.index("ate"), TEXT.index("I am") + 4)  # most of sentence 1, 4 of the 18 chars of sentence 2
    assert decoding.sentences_of_spans(TEXT, [into_next]) == [1]
    assert decoding.sentences_of_spans(TEXT, []) == [] and decoding.sentences_of_spans("", [(0, 3)]) == []


def test_sentence_set_metrics_hand_computed():
    gold = [[0, 2], [1], [], []]
    pred = [[0], [1, 3], [], [2]]
    m = metrics.sentence_set_metrics(gold, pred)
    # hits 1, 1, 0, 0 -> tp 2; fp 0 + 1 + 0 + 1 = 2; fn 1 + 0 + 0 + 0 = 1
    assert m["sentence_precision"] == pytest.approx(2 / 4)
    assert m["sentence_recall"] == pytest.approx(2 / 3)
    assert m["sentence_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # per pair F1: 2/3, 2/3, 1 (both empty), 0 -> 7/12
    assert m["sentence_f1_macro"] == pytest.approx(7 / 12)
    assert m["set_exact_match"] == pytest.approx(1 / 4)  # only the empty pair
    assert metrics.sentence_set_metrics([[0, 2]], [[2, 0]])["set_exact_match"] == 1.0


def test_ranking_metrics_hand_computed():
    gold = [[0, 2], [1], [], [3], [1]]
    scores = [[0.9, 0.5, 0.3],  # ranking 1 0 1: AP (1 + 2/3) / 2 = 5/6; R 2, top {0, 1} -> 1/2
              [0.2, 0.8, 0.1, 0.4],  # gold first: AP 1, R-precision 1
              [0.5, 0.4],  # no gold: not ranked
              [0.4, 0.3, 0.2, 0.1],  # gold last of 4: AP 1/4, top 1 = {0} -> 0
              [0.5, 0.5]]  # a tie: AP 1/2 (one cut calls both); top 1 by sentence order = {0} -> 0
    m = metrics.ranking_metrics(gold, scores)
    assert m["n_ranked_pairs"] == 4
    assert m["sentence_map"] == pytest.approx((5 / 6 + 1 + 1 / 4 + 1 / 2) / 4)
    assert m["r_precision"] == pytest.approx((1 / 2 + 1 + 0 + 0) / 4)
    assert math.isnan(metrics.ranking_metrics([[]], [[0.3]])["sentence_map"])
    with pytest.raises(ValueError, match="gold sentence 2"):
        metrics.ranking_metrics([[2]], [[0.1, 0.2]])


def test_post_bootstrap_macro_f1_is_the_papers_on_each_resample():
    """scripts/post_bootstrap.py scores a resample of posts by counts: drawn once each it is paper_macro_f1; each post
    twice, the same; p4 left out and p1 twice, paper_macro_f1 of that multiset of posts."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "post_bootstrap", Path(__file__).resolve().parents[1] / "scripts" / "post_bootstrap.py")
    post_bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(post_bootstrap)
    gold, probs = hand_matrix()
    pred = metrics.predict_labels(probs)
    weights = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [2, 1, 1, 0]])
    got = post_bootstrap.macro_f1(gold, pred, weights)
    rows = [0, 0, 1, 2]
    assert got[0] == pytest.approx(metrics.paper_metrics(gold, probs)["paper_macro_f1"])
    assert got[1] == pytest.approx(got[0])
    assert got[2] == pytest.approx(metrics.paper_metrics(gold[rows], probs[rows])["paper_macro_f1"])
    assert got[2] != pytest.approx(got[0])
