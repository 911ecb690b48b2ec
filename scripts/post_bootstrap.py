"""Two runs on the same test posts (one fold, one seed each), paired: the paper's macro F1 of each and of their
difference, with a percentile-bootstrap 95% interval over the test posts (the posts resampled with replacement, the
same resample for both runs). It says how much of a difference the test sample alone could make; it does not say
how much another seed or another fold would move it (report.py's corrected t interval over folds does).
Thresholds: 0.5, and each run's own per-symptom cuts tuned on its validation posts (metrics.json paper_thresholds).

    python scripts/post_bootstrap.py A=outputs/x/fold0-seed42 B=outputs/y/fold0-seed42 [--n_boot 10000]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics import SYMPTOMS, post_label_matrix, predict_labels  # noqa: E402


def macro_f1(gold: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro F1 over the label columns of posts x labels 0/1 matrices, once per row of `weights` (resamples x posts:
    how many times each post was drawn); a label with no gold and no prediction scores 0, as scikit-learn's
    zero_division=0 does (metrics.paper_metrics)."""
    tp = weights @ (gold & pred)
    fp = weights @ ((1 - gold) & pred)
    fn = weights @ (gold & (1 - pred))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean(axis=1)


def load_run(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[float]]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    post_ids, gold, prob = post_label_matrix(rows, [r["prob"] for r in rows])
    tuned = json.loads((folder / "metrics.json").read_text())["test"].get("paper_thresholds", {})
    return post_ids, gold, prob, [tuned.get(s, 0.5) for s in SYMPTOMS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs=2, metavar="NAME=RUN_FOLDER")
    ap.add_argument("--n_boot", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names, runs = [], []
    for spec in args.runs:
        name, _, folder = spec.rpartition("=")
        names.append(name or folder)
        runs.append(load_run(Path(folder)))
    (ids_a, gold, prob_a, cut_a), (ids_b, gold_b, prob_b, cut_b) = runs
    if ids_a != ids_b or not np.array_equal(gold, gold_b):
        sys.exit("post_bootstrap: the two runs were not tested on the same posts with the same labels")
    n = len(ids_a)
    draws = np.random.default_rng(args.seed).integers(0, n, (args.n_boot, n))
    weights = np.zeros((args.n_boot, n), dtype=np.int64)
    np.add.at(weights, (np.arange(args.n_boot)[:, None], draws), 1)
    print(f"{n} test posts, {args.n_boot} resamples; paper_macro_f1 (ten labels), bootstrap 95% intervals over posts")
    print(f"| thresholds | {names[0]} | {names[1]} | {names[0]} - {names[1]} |\n|---|---|---|---|")
    once = np.ones((1, n), dtype=np.int64)  # every post drawn once: the runs' own paper_macro_f1
    for label, (ta, tb) in {"0.5": (0.5, 0.5), "tuned (each run's own)": (cut_a, cut_b)}.items():
        pa, pb = predict_labels(prob_a, ta), predict_labels(prob_b, tb)
        (fa,), (fb,) = macro_f1(gold, pa, once), macro_f1(gold, pb, once)
        ba, bb = macro_f1(gold, pa, weights), macro_f1(gold, pb, weights)
        cell = [f"{f:.3f} [{lo:.3f}, {hi:.3f}]" for f, (lo, hi) in
                ((fa, np.percentile(ba, [2.5, 97.5])), (fb, np.percentile(bb, [2.5, 97.5])),
                 (fa - fb, np.percentile(ba - bb, [2.5, 97.5])))]
        print(f"| {label} | " + " | ".join(cell) + " |")


if __name__ == "__main__":
    main()
