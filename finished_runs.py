"""A finished run read back from its folder: whether its outputs are whole (`incomplete_run`), and its test metrics,
rows, history and timings (`run_artifacts`), as report.py and scripts/compare_folds.py pair them. A damaged file
is a UserError naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from baselines import choose_threshold, with_threshold
from rundir import PREDICTION_FILES
from utils import UserError


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file a run wrote; a line that is not a JSON object is a UserError naming file and line."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise UserError(f"{path}: line {i} is not JSON ({e})") from None
        if not isinstance(rows[-1], dict):
            raise UserError(f"{path}: line {i} is not a JSON object")
    return rows


def read_json(path: Path) -> dict:
    """A JSON object a run wrote; missing, damaged or not an object is a UserError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def incomplete_run(run_dir: Path, classify: bool) -> str | None:
    """Why a run's outputs cannot be read back as a finished run, or None when they are whole: metrics.json,
    history.json and run_stats.json are JSON objects, and every scored split's predictions file holds as many
    rows as the split's metrics counted (`n` examples, `n_pairs` for span tasks), each a JSON object with the
    fields the report reads. A kill or a full disk while train.py wrote them leaves a run that looks finished."""
    try:
        for name in ("history.json", "run_stats.json"):
            read_json(run_dir / name)
        saved = read_json(run_dir / "metrics.json")
        for split, file in PREDICTION_FILES.items():
            metrics = saved.get(split)
            if split == "test_shift" and not metrics:
                continue
            if not isinstance(metrics, dict):
                return f"metrics.json has no '{split}' metrics"
            expected = metrics.get("n", metrics.get("n_pairs"))
            if not isinstance(expected, int):
                return f"metrics.json: '{split}' has no row count (n or n_pairs)"
            if not (run_dir / file).is_file():
                return f"{file} is missing"
            rows = read_jsonl(run_dir / file)
            if len(rows) != expected:
                return f"{file} has {len(rows)} rows, its metrics counted {expected}"
            need = ("label", "prob") if classify else ("pred_text", "gold_texts")
            bad = next((i for i, r in enumerate(rows, 1) if any(k not in r for k in need)), None)
            if bad is not None:
                return f"{file}: line {bad} lacks one of {', '.join(need)}"
    except UserError as e:
        return str(e)
    return None


def run_artifacts(run_dir: Path, classify: bool) -> dict:
    """One finished run read back: scalar test metrics, test rows (with `pred` at the threshold chosen
    on validation), its training history and MLflow run id."""
    saved = read_json(run_dir / "metrics.json")
    threshold = None
    if classify:
        val = read_jsonl(run_dir / "val_predictions.jsonl")
        threshold = choose_threshold([r["label"] for r in val], [r["prob"] for r in val])
    metrics, rows = scored_split(saved["test"], run_dir / "predictions.jsonl", threshold)
    shift = scored_split(saved["test_shift"], run_dir / "shift_predictions.jsonl", threshold)[0] \
        if saved.get("test_shift") else None
    run_stats = read_json(run_dir / "run_stats.json")
    per_symptom = {k: {label: v["f1"] for label, v in saved["test"][k].items()}
                   for k in ("paper_per_symptom", "paper_per_symptom_tuned") if k in saved["test"]}
    return {"metrics": metrics, "shift_metrics": shift, "rows": rows, "mlflow_run_id": run_stats.get("mlflow_run_id"),
            "history": read_json(run_dir / "history.json"), "per_symptom": per_symptom,
            "train_seconds": run_stats.get("train_seconds")}


def scored_split(saved: dict, predictions: Path, threshold: float | None) -> tuple[dict, list[dict]]:
    """(scalar metrics, rows) of one scored split of a run; with a validation threshold (classifying), the
    metrics at it are added and each row gets its `pred`."""
    metrics, rows = {k: v for k, v in saved.items() if isinstance(v, float)}, read_jsonl(predictions)
    if threshold is not None:
        metrics.update(with_threshold([r["label"] for r in rows], [r["prob"] for r in rows], threshold))
        rows = [{**r, "pred": int(r["prob"] >= threshold)} for r in rows]
    return metrics, rows
