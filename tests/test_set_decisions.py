"""scripts/set_decisions.py: the evidence set rules it compares, on hand-made sentence scores."""
import importlib.util
from pathlib import Path

import numpy as np

import decoding

spec = importlib.util.spec_from_file_location("set_decisions",
                                              Path(__file__).resolve().parents[1] / "scripts" / "set_decisions.py")
set_decisions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set_decisions)

SCORES = [np.array([3.0, 2.5, -1.0]), np.array([1.0, -2.0, 0.5]), np.array([-3.0, -4.0, -np.inf])]
CRITERIA = ["SLEEP_ISSUES", "FATIGUE", "FATIGUE"]


def test_each_rule_decodes_the_sets_by_hand():
    decode = set_decisions.decode_sets
    assert decode(SCORES, {"rule": "absolute", "threshold": 0.0}, CRITERIA) == [{0, 1}, {0, 2}, {0}]  # best if none
    assert decode(SCORES, {"rule": "absolute", "threshold": 0.0, "per_criterion": {"FATIGUE": 0.7}},
                  CRITERIA) == [{0, 1}, {0}, {0}]
    assert decode(SCORES, {"rule": "relative", "margin": 0.6}, CRITERIA) == [{0, 1}, {0, 2}, {0}]
    assert decode(SCORES, {"rule": "relative", "margin": 0.4}, CRITERIA) == [{0}, {0}, {0}]
    # the absolute rule is what evaluate.py decodes
    for t in (-3.5, 0.0, 0.7, 2.7):
        assert decode(SCORES, {"rule": "absolute", "threshold": t}, CRITERIA) == decoding.decode_sets(SCORES, t, True)


def test_the_tuned_margin_and_threshold_reproduce_the_gold_sets():
    gold = [{0, 1}, {0}, {0}]
    scores = [np.array([3.0, 2.5, -1.0]), np.array([1.0, -2.0, -0.5]), np.array([2.0, 0.0])]  # gaps 0.5 in, 1.5 out
    relative = set_decisions.tune_set_decision("relative", scores, gold, CRITERIA)
    assert relative["rule"] == "relative" and 0.5 <= relative["margin"] < 1.5
    assert set_decisions.decode_sets(scores, relative, CRITERIA) == gold
    absolute = set_decisions.tune_set_decision("absolute", SCORES, gold, CRITERIA)
    assert set_decisions.decode_sets(SCORES, absolute, CRITERIA) == gold  # 0.5 < t < 2.5 separates them
    assert 0.5 < absolute["threshold"] < 2.5
    assert set_decisions.tune_set_decision("zero", SCORES, gold, CRITERIA) == {"rule": "absolute", "threshold": 0.0}
