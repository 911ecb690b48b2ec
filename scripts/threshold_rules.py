"""How per-symptom thresholds should be chosen when a rare symptom has a handful of validation positives,
measured after the fact on finished cross-validations: each rule picks thresholds from a fold's validation
probabilities (val_predictions.jsonl) and is scored on its test probabilities (predictions.jsonl), so no model
is retrained. The bag of words is refit on the same folds and thresholded by the same rules.

Rules:
  half       0.5 for every symptom (the authors' notebook)
  symptom    each symptom's own best cut on validation (today's default, metrics.tune_thresholds)
  pooled     one cut for all nine, the best micro F1 over the validation post x symptom matrix
  floor5     a symptom's own cut where validation has >= 5 positives for it, the pooled cut otherwise
  shrink10   the symptom's cut shrunk toward the pooled one: w t_s + (1 - w) t_pooled, w = n_pos / (n_pos + 10)

    python scripts/threshold_rules.py --data_dir corpora/written NAME=outputs/written/criteria-minilm [...]

The first folder's splits refit the bag of words; the other folders must have the same folds (fold k = k-th). A run
(fold k, seed s) is paired with fold k's bag of words, which has no seed; a folder of several seeds gives one row per
run, and the corrected interval counts the runs (Nadeau & Bengio's 1/n + test/train).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import data  # noqa: E402
from config import make_config  # noqa: E402
from intervals import corrected_t_ci  # noqa: E402
from metrics import THRESHOLD_GRID, f1_from_counts, paper_metrics, post_label_matrix, tune_thresholds  # noqa: E402
from models import TASKS  # noqa: E402

SYMPTOMS = data.SYMPTOMS


def pooled_cut(gold, probs) -> float:
    """The grid cut with the best micro F1 over every (post, symptom) cell; ties to the cut closest to 0.5."""
    gold = np.asarray(gold)[:, : len(SYMPTOMS)]
    best, best_f1 = 0.5, -1.0
    for t in sorted(THRESHOLD_GRID, key=lambda c: (abs(c - 0.5), -c)):
        called = probs >= t
        f1 = float(f1_from_counts((called & (gold == 1)).sum(), (called & (gold == 0)).sum(),
                                  (~called & (gold == 1)).sum()))
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(t), f1
    return best


def rules(gold, probs) -> dict[str, np.ndarray]:
    """Each rule's nine thresholds, from validation gold (posts x 10) and probabilities (posts x 9)."""
    own, pooled = tune_thresholds(gold, probs), pooled_cut(gold, probs)
    n_pos = np.asarray(gold)[:, : len(SYMPTOMS)].sum(0)
    w = n_pos / (n_pos + 10)
    return {"half": np.full(len(SYMPTOMS), 0.5), "symptom": own, "pooled": np.full(len(SYMPTOMS), pooled),
            "floor5": np.where(n_pos >= 5, own, pooled), "shrink10": w * own + (1 - w) * pooled}


def read_rows(path: Path) -> tuple[list[dict], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows, np.array([r["prob"] for r in rows])


def score_fold(val, test) -> dict[str, dict]:
    """{rule: paper metrics on test} from (examples, probs) of validation and of test."""
    _, vg, vp = post_label_matrix(*val)
    _, tg, tp = post_label_matrix(*test)
    return {name: paper_metrics(tg, tp, cuts) for name, cuts in rules(vg, vp).items()}


def fold_of(run: str) -> int:
    return int(run[4:].split("-seed")[0])  # "fold3-seed42" -> 3


def model_folds(folder: Path) -> dict[str, dict]:
    """{run name (fold k, seed s): scores} of the finished runs of a report folder, every seed."""
    return {run.name: score_fold(read_rows(run / "val_predictions.jsonl"), read_rows(run / "predictions.jsonl"))
            for run in sorted(folder.glob("fold*-seed*"), key=lambda r: (r.name.split("-seed")[1], fold_of(r.name)))
            if (run / "metrics.json").exists()}  # written last: a run still training is left out


def bow_folds(folder: Path, data_dir: str) -> list[dict]:
    cfg = make_config(task="criteria", unit="post", data_dir=data_dir)
    corpus, task, out = data.load_corpus(data_dir), TASKS["criteria"], []
    for split_file in sorted((folder / "splits").glob("fold*.json")):
        split = json.loads(split_file.read_text())
        train_ex, val_ex, test_ex = (task.examples(corpus, split[s], cfg) for s in ("train", "val", "test"))
        val_p, test_p = baselines.bow_probs(train_ex, val_ex, test_ex)
        out.append(score_fold((val_ex, val_p), (test_ex, test_p)))
    return out


def table(name: str, folds: list[dict], ratio: float) -> None:
    names = list(folds[0])
    print(f"\n### {name} ({len(folds)} runs)\n")
    print("| rule | paper_macro_f1 | paper_micro_f1 | vs symptom: mean [corrected 95% CI] | "
          + " | ".join(s[:10] for s in SYMPTOMS) + " |")
    print("|---|---|---|---|" + "---|" * len(SYMPTOMS))
    base = np.array([f["symptom"]["paper_macro_f1"] for f in folds])
    for r in names:
        macro = np.array([f[r]["paper_macro_f1"] for f in folds])
        micro = np.mean([f[r]["paper_micro_f1"] for f in folds])
        diff = macro - base
        lo, hi = corrected_t_ci(diff, ratio) if r != "symptom" else (None, None)
        ci = f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else "-"
        per = " | ".join(f"{np.mean([f[r]['per_symptom'][s]['f1'] for f in folds]):.2f}" for s in SYMPTOMS)
        print(f"| {r} | {macro.mean():.3f} | {micro:.3f} | {ci} | {per} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--ratio", type=float, default=0.125, help="test/train posts of a fold (corrected interval)")
    ap.add_argument("--no_bow", action="store_true")
    ap.add_argument("runs", nargs="+", help="NAME=report output folder (criteria --unit post)")
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs)
    scored = {name: model_folds(Path(folder)) for name, folder in runs.items()}  # read once: both tables, same runs
    for name, folds in scored.items():
        table(name, list(folds.values()), args.ratio)
    if args.no_bow:
        return
    bow = bow_folds(Path(next(iter(runs.values()))), args.data_dir)
    table("bag-of-words LR", bow, args.ratio)
    print("\n### each model - bag of words, both at per-symptom cuts (each run paired with its fold's bag of words)\n")
    print("| model | runs | metric | model | bag of words | difference [corrected 95% CI] |")
    print("|---|---|---|---|---|---|")
    for name, folds in scored.items():
        for metric in ("paper_macro_f1", "paper_micro_f1"):
            a = np.array([f["symptom"][metric] for f in folds.values()])
            b = np.array([bow[fold_of(run)]["symptom"][metric] for run in folds])  # the bag of words has no seed
            lo, hi = corrected_t_ci(a - b, args.ratio)
            ci = f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None else "(one fold: no interval)"
            print(f"| {name} | {len(folds)} | {metric} | {a.mean():.3f} | {b.mean():.3f} | "
                  f"{(a - b).mean():+.3f} {ci} |")


if __name__ == "__main__":
    main()
