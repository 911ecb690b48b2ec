"""Metrics, span decoding, evaluation of a checkpoint, and prediction on new posts.

    python evaluate.py --checkpoint outputs/run/checkpoints/best [--data_dir DIR] [--split test] [--output FILE]
    python evaluate.py --checkpoint outputs/run/checkpoints/best --predict posts.csv --output predictions.jsonl
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --checkpoint ...   # same numbers, two processes

Reading order: classification metrics -> SQuAD-style span metrics -> span candidates per window
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
from models import TASKS, load_checkpoint, resolve_checkpoint
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


# --------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def model_outputs(model, loader, accelerator, cfg) -> dict[str, np.ndarray]:
    """Per-window outputs, gathered from every process exactly once (gather_for_metrics)."""
    model.eval()
    parts = collections.defaultdict(list)
    for batch in loader:
        out = model(**batch)
        res = {"feature_idx": batch["feature_idx"]}
        if "cls_logits" in out:
            res["prob"] = out["cls_logits"].float().softmax(-1)[:, 1]
        if "start_logits" in out:
            res.update(window_candidates(out["start_logits"].float(), out["end_logits"].float(),
                                         batch["context_mask"], cfg.max_answer_tokens, cfg.n_best))
        for k, v in accelerator.gather_for_metrics(res).items():
            parts[k].append(v.cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def evaluate(model, loader, features, examples, cfg, accelerator, null_threshold=None):
    """(metrics, predictions, null_threshold) of `model` on one split; the threshold is tuned when None."""
    task = TASKS[cfg.task]
    out = model_outputs(model, loader, accelerator, cfg)
    predictions = [{"post_id": e["post_id"], "criterion": e["criterion"], "label": e["label"],
                    **({"sentence_id": e["sentence_id"]} if "sentence_id" in e else {})} for e in examples]
    metrics = {}
    if task.classify:
        prob = np.zeros(len(examples))  # a pair is as positive as its most positive window
        np.maximum.at(prob, [features[i]["example_idx"] for i in out["feature_idx"]], out["prob"])
        metrics.update(classification_metrics([e["label"] for e in examples], prob, [e["criterion"] for e in examples]))
        for p, pr in zip(predictions, prob):
            p.update(prob=float(pr), pred=int(pr >= 0.5))
    if task.spans:
        texts = [e["text"] for e in examples]
        decoded = decode_pairs(features, out, len(examples), texts)
        golds = [[e["text"][s:t] for s, t in e["spans"]] for e in examples]
        if task.classify:  # joint: the span head is scored on the pairs that have gold evidence
            scored = [i for i, g in enumerate(golds) if g]
        else:
            scored = list(range(len(examples)))
            if null_threshold is None:
                null_threshold = tune_null_threshold(decoded, golds) if cfg.include_negatives else float("inf")
            for d in decoded:
                if d["null_score"] - d["span_score"] > null_threshold:
                    d["text"], d["start"], d["end"] = "", -1, -1
        metrics.update(span_metrics([decoded[i]["text"] for i in scored], [golds[i] for i in scored]))
        if not task.classify:
            metrics["null_threshold"] = null_threshold if np.isfinite(null_threshold) else None
        for p, d, g in zip(predictions, decoded, golds):
            p.update(pred_text=d["text"], pred_start=d["start"], pred_end=d["end"], span_score=d["span_score"],
                     null_score=d["null_score"], gold_texts=g)
    if task.classify and task.spans:
        metrics["combined"] = (metrics["f1_macro"] + metrics["span_f1"]) / 2
    return metrics, predictions, null_threshold


def metric_names(cfg) -> list[str]:
    """The numbers `evaluate` reports on a split for cfg's task: what --early_stopping_metric can watch.
    Read off the metric functions themselves (on two made-up examples), so the list cannot drift from them."""
    task, metrics = TASKS[cfg.task], {}
    if task.classify:
        metrics.update(classification_metrics([0, 1], [0.2, 0.8]))
    if task.spans:
        nulls = not task.classify and cfg.include_negatives  # evidence with negatives: also the null-answer scores
        metrics.update(span_metrics(["a", ""], [["a"], []] if nulls else [["a"], ["b"]]))
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
    features = data.featurize(tokenizer, examples, cfg.max_length, cfg.doc_stride, task.windows(cfg))
    loader = data.make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id,
                              **dataloader_kwargs(cfg, accelerator.device.type == "cuda"))
    model, loader = accelerator.prepare(model, loader)
    threshold = extra.get("null_threshold")
    metrics, predictions, _ = evaluate(model, loader, features, examples, cfg, accelerator,
                                       float("inf") if threshold is None else threshold)
    if accelerator.is_main_process:
        log.info("%s on %s (%d examples, %d processes):\n%s", cfg.task, args.split, len(examples),
                 accelerator.num_processes, format_metrics(metrics))
        if args.output:
            Path(args.output).write_text(dumps({args.split: metrics}, indent=2))


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
    features = data.featurize(tokenizer, examples, cfg.max_length, cfg.doc_stride, TASKS[cfg.task].windows(cfg))
    loader = data.make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id)
    model, loader = accelerator.prepare(model, loader)
    threshold = extra.get("null_threshold")
    _, preds, _ = evaluate(model, loader, features, examples, cfg, accelerator,
                           float("inf") if threshold is None else threshold)
    out = {}
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
        if "pred_text" in p:
            row.update(evidence_text=p["pred_text"], evidence_start=p["pred_start"], evidence_end=p["pred_end"],
                       span_score=p["span_score"], null_score=p["null_score"])
        out[key] = row
    return list(out.values())


if __name__ == "__main__":
    run_main(main)
