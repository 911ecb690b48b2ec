"""Post-level precision / recall / F1 of `evaluate.py --predict` rows against a labelled corpus's (post, symptom) pairs,
and the share of rows predicted positive.

    python scripts/predict_prf.py PREDICTIONS.jsonl DATA_DIR [SPLITS.json] [--tuned]

DATA_DIR: a ReDSM5 folder (`data.py --make_demo DIR` writes the demo as one); SPLITS.json: score only its "test"
posts; --tuned: read `pred_tuned` (the symptom's validation threshold) instead of `pred` (0.5).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
rows = [json.loads(line) for line in open(args[0], encoding="utf-8")]
gold = set(data.load_corpus(args[1]).positives())
only = set(json.load(open(args[2]))["test"]) if len(args) > 2 else None
tp = fp = fn = positive = n = 0
for r in rows:
    if only is not None and r["post_id"] not in only:
        continue
    pred = r.get("pred_tuned", r["pred"]) if "--tuned" in sys.argv else r["pred"]
    key = (r["post_id"], r["criterion"])
    n, positive = n + 1, positive + pred
    tp, fp, fn = tp + (pred and key in gold), fp + (pred and key not in gold), fn + (not pred and key in gold)
precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
print(f"rows {n}, predicted positive {positive} ({positive / n:.1%}); precision {precision:.3f} recall {recall:.3f} "
      f"F1 {2 * precision * recall / max(precision + recall, 1e-9):.3f}")
