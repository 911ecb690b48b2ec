"""Per-symptom F1 of a report.py cross-validation at the ReDSM5 protocol (post x symptom, each symptom's threshold
tuned on the fold's validation posts), mean over the folds: the models from their folds' metrics.json, the bag of
words refit on the same folds (baselines.fold_baselines, as report.py runs it).

    python scripts/per_symptom.py --data_dir corpora/written NAME=outputs/written/criteria-tiny [NAME=...]
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

ORDER = ["DEPRESSED_MOOD", "WORTHLESSNESS", "SUICIDAL_THOUGHTS", "ANHEDONIA", "FATIGUE", "SLEEP_ISSUES",
         "COGNITIVE_ISSUES", "APPETITE_CHANGE", "PSYCHOMOTOR"]  # ReDSM5's, most frequent first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("runs", nargs="+", help="NAME=report output folder (criteria --unit post or joint)")
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs)
    table = {}
    for name, folder in runs.items():
        per = [json.loads(p.read_text())["test"]["paper_per_symptom_tuned"]
               for p in sorted(Path(folder).glob("fold*-seed*/metrics.json"))]
        table[name] = {s: float(np.mean([f[s]["f1"] for f in per])) for s in ORDER}
    folder = Path(next(iter(runs.values())))
    cfg = make_config(task="criteria", unit="post", data_dir=args.data_dir)
    corpus = data.load_corpus(args.data_dir)
    bow = []
    for split_file in sorted((folder / "splits").glob("fold*.json")):
        split = json.loads(split_file.read_text())
        metrics = baselines.fold_baselines(corpus, split, cfg)["metrics"]["bag-of-words LR"]
        bow.append(metrics["paper_per_symptom_tuned"])
    table["bag-of-words LR"] = {s: float(np.mean([f[s]["f1"] for f in bow])) for s in ORDER}
    support = {s: sum(1 for (_, sy) in corpus.positives() if sy == s) for s in ORDER}
    print("| symptom (positive posts) | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for s in ORDER:
        print(f"| {s} ({support[s]}) | " + " | ".join(f"{table[n][s]:.3f}" for n in table) + " |")
    print("| mean (= macro over the nine) | " + " | ".join(f"{np.mean(list(table[n].values())):.3f}" for n in table)
          + " |")


if __name__ == "__main__":
    main()
