"""Scoring: a model's outputs on one split turned into metrics and predictions, with the thresholds tuned on
validation. `evaluate` is what train.py validates and tests with, and what evaluate.py's command line runs.

Reading order: `model_outputs` runs a model over a loader (gathered across processes exactly once) ->
scoring the classification and the evidence of each (criterion, post) pair (metrics.py, decoding.py) ->
`evaluate` -> `score_split`, what a training run scores a split with (the eval batch halved on out of memory) ->
the names of its metrics and the console tables.
"""
from __future__ import annotations

import collections
import logging
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

import alignment
import data
from config import post_encoding, sentence_unit
from decoding import (
    decode_pairs,
    decode_sets,
    pair_rows,
    sentence_scores,
    sentences_of_spans,
    top_sentences,
    tune_null_threshold,
    tune_sentence_threshold,
    window_candidates,
)
from features import make_loader
from metrics import (
    classification_metrics,
    post_level_metrics,
    ranking_metrics,
    sentence_set_metrics,
    span_metrics,
)
from models import INPUT_KEYS, TASKS
from utils import UserError, dataloader_kwargs, first_line, out_of_memory

log = logging.getLogger("redsm5")


@torch.inference_mode()
def model_outputs(model, loader, accelerator, cfg, desc: str | None = None) -> dict[str, np.ndarray]:
    """Per-window outputs, gathered from every process exactly once (gather_for_metrics). Under `--encoding post`
    a row is a window and its arrays have a criteria axis after the row (see `pair_rows`). With `desc`, a progress
    bar (main process, on a terminal)."""
    from tqdm.auto import tqdm

    model.eval()
    parts = collections.defaultdict(list)
    bar = desc is not None and accelerator.is_main_process and sys.stderr.isatty()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not bar):
        out = model(**{k: v for k, v in batch.items() if k in INPUT_KEYS})
        res, real = {"feature_idx": batch["feature_idx"]}, batch["feature_idx"] >= 0  # -1: a row padding a batch
        if "cls_logits" in out:
            res["prob"] = out["cls_logits"].float().softmax(-1)[..., 1]
        if "tag_logits" in out:  # --evidence_head tag: the whole logits, one width for every batch
            tag = out["tag_logits"].float()
            res["tag_logits"] = torch.nn.functional.pad(tag, (0, cfg.max_length - tag.shape[-1]), value=-1e4)
        if "start_logits" in out:
            start, end = out["start_logits"].float(), out["end_logits"].float()
            mask = batch["context_mask"].unsqueeze(1).expand_as(start) if start.dim() == 3 else batch["context_mask"]
            found = window_candidates(start.flatten(0, -2), end.flatten(0, -2), mask.flatten(0, -2),
                                      cfg.max_answer_tokens, cfg.n_best)
            res.update({k: v.unflatten(0, start.shape[:-1]) for k, v in found.items()})
            room = cfg.max_length - start.shape[-1]  # the whole logits too, for sentence scores: one width
            res["start_logits"] = torch.nn.functional.pad(start, (0, room), value=-1e4)
            res["end_logits"] = torch.nn.functional.pad(end, (0, room), value=-1e4)
        if not real.all():
            res = {k: v[real.to(v.device)] for k, v in res.items()}
        for k, v in accelerator.gather_for_metrics(res).items():
            parts[k].append(v.cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


# --------------------------------------------------------------------------- scoring

def has_post_pairs(cfg) -> bool:
    """Whether cfg's task predicts every (post, criterion) pair: criteria --unit post and joint."""
    return TASKS[cfg.task].classify and not sentence_unit(cfg)


def score_classification(examples, features, out, cfg, thresholds: dict, tune: bool, predictions) -> dict:
    """Binary metrics of the pairs (a pair is as positive as its most positive window) and, where every
    (post, criterion) pair is an example, the paper's post-level metrics at 0.5 and at per-symptom thresholds
    (tuned here on validation; a checkpoint without them gets no tuned metrics, never thresholds tuned on test)."""
    prob = np.zeros(len(examples))
    np.maximum.at(prob, [features[i]["example_idx"] for i in out["feature_idx"]], out["prob"])
    for p, pr in zip(predictions, prob):
        p.update(prob=float(pr), pred=int(pr >= 0.5))
    metrics = classification_metrics([e["label"] for e in examples], prob, [e["criterion"] for e in examples])
    if has_post_pairs(cfg):
        metrics.update(post_level_metrics(examples, prob, None if tune else thresholds.get("paper_thresholds", {})))
        if tune:
            thresholds["paper_thresholds"] = metrics["paper_thresholds"]
    return metrics


def best_spans(examples, features, out, cfg, thresholds: dict, tune: bool) -> list[dict]:
    """The best span of every pair; evidence with negatives answers null where the null score beats the best span
    by more than the null threshold (tuned on validation)."""
    texts = [e["text"] for e in examples]
    golds = [[t[s:e] for s, e in ex["spans"]] for ex, t in zip(examples, texts)]
    decoded = decode_pairs(features, out, len(examples), texts)
    if TASKS[cfg.task].classify:  # joint: scored on the pairs with gold evidence, no null answers
        return decoded
    if tune:
        tuned = tune_null_threshold(decoded, golds) if cfg.include_negatives else math.inf
        thresholds["null_threshold"] = tuned if math.isfinite(tuned) else None  # None: never null (JSON)
    limit = math.inf if thresholds.get("null_threshold") is None else thresholds["null_threshold"]
    for d in decoded:
        if d["null_score"] - d["span_score"] > limit:
            d["text"], d["start"], d["end"] = "", -1, -1
    return decoded


def score_spans(examples, features, out, cfg, thresholds: dict, tune: bool, predictions) -> dict:
    """SQuAD-style metrics of the best span of each pair, and the sentence-set metrics of the set decoding
    (with those of the best span's sentences beside them, as single_span_*). joint scores its pairs with gold
    evidence; evidence with negatives may answer null."""
    texts = [e["text"] for e in examples]
    golds = [[t[s:e] for s, e in ex["spans"]] for ex, t in zip(examples, texts)]
    joint, nulls = TASKS[cfg.task].classify, not TASKS[cfg.task].classify and cfg.include_negatives
    scored = [i for i, g in enumerate(golds) if g] if joint else list(range(len(examples)))
    split = {t: alignment.sentence_spans(t) for t in set(texts)}  # once per post, not once per criterion
    scores = sentence_scores(features, out, texts, split)
    gold_sets = [sentences_of_spans(t, ex["spans"], split[t]) for ex, t in zip(examples, texts)]
    if tune:
        thresholds["sentence_threshold"] = tune_sentence_threshold([scores[i] for i in scored],
                                                                   [gold_sets[i] for i in scored], not nulls)
    pred_sets = decode_sets(scores, thresholds.get("sentence_threshold", 0.0), at_least_one=not nulls)
    if cfg.evidence_head == "span":
        decoded = best_spans(examples, features, out, cfg, thresholds, tune)
    else:
        decoded = top_sentences(scores, pred_sets, texts, split)
    metrics = span_metrics([decoded[i]["text"] for i in scored], [golds[i] for i in scored])
    if not joint and cfg.evidence_head == "span":
        metrics["null_threshold"] = thresholds["null_threshold"]
    single = [sentences_of_spans(t, [(d["start"], d["end"])] if d["start"] >= 0 else [], split[t])
              for d, t in zip(decoded, texts)]
    gold_scored = [gold_sets[i] for i in scored]
    metrics.update(sentence_set_metrics(gold_scored, [pred_sets[i] for i in scored]))
    metrics.update(ranking_metrics(gold_scored, [np.nan_to_num(scores[i], neginf=-1e30) for i in scored]))
    metrics.update({f"single_span_{k}": v for k, v in sentence_set_metrics(gold_scored, [single[i] for i in scored])
                    .items() if k in ("sentence_f1", "set_exact_match")})
    several = [i for i in scored if len(gold_sets[i]) >= 2]  # the pairs one span cannot hold
    for name, sets in (("multi", pred_sets), ("multi_single_span", single)) if several else ():
        m = sentence_set_metrics([gold_sets[i] for i in several], [sets[i] for i in several])
        metrics.update({f"{name}_{k}": m[k] for k in ("sentence_f1", "set_exact_match")})
    metrics["n_multi_sentence_pairs"] = len(several)
    metrics["sentence_threshold"] = thresholds["sentence_threshold"]
    for p, d, g, gs, chosen, t, sc in zip(predictions, decoded, golds, gold_sets, pred_sets, texts, scores):
        spans = [split[t][k] for k in sorted(chosen)]
        p.update(pred_text=d["text"], pred_start=d["start"], pred_end=d["end"], span_score=d["span_score"],
                 null_score=d["null_score"], gold_texts=g, gold_sentences=gs, pred_sentences=sorted(chosen),
                 pred_sentence_spans=[list(s) for s in spans], pred_sentence_texts=[t[a:b] for a, b in spans],
                 sentence_scores=sc.tolist())  # each sentence's score (-inf, JSON null: no window reads it)
    return metrics


def evaluate(model, loader, features, examples, cfg, accelerator, thresholds: dict | None = None,
             desc: str | None = None):
    """(metrics, predictions, thresholds) of `model` on one split. `thresholds` (null answer, evidence
    sentences, per-symptom post-level thresholds), as tuned on validation, are applied; None tunes them here."""
    task, tune = TASKS[cfg.task], thresholds is None
    thresholds = dict(thresholds or {})
    out = model_outputs(model, loader, accelerator, cfg, desc)
    broken = [k for k, v in out.items() if v.dtype.kind == "f" and np.isnan(v).any()]
    if broken:  # weights that diverged (e.g. steps skipped under --skip_nonfinite): no metric of NaN is honest
        raise UserError(f"the model's outputs are NaN ({', '.join(broken)}): its weights diverged; lower --lr, keep "
                        "--max_grad_norm on, or check the data")
    if post_encoding(cfg):
        out, features = pair_rows(out, features)
    predictions = [{"post_id": e["post_id"], "criterion": e["criterion"], "label": e["label"],
                    **({"sentence_id": e["sentence_id"]} if "sentence_id" in e else {})} for e in examples]
    metrics = {}
    if task.classify:
        metrics.update(score_classification(examples, features, out, cfg, thresholds, tune, predictions))
    if task.spans:  # a span head's n-best candidates, or a tag head's logits
        metrics.update(score_spans(examples, features, out, cfg, thresholds, tune, predictions))
    if task.classify and task.spans:
        metrics["combined"] = (metrics["f1_macro"] + metrics["span_f1"]) / 2
    return metrics, predictions, thresholds


SPLITS_SCORED = ("val", "test", "test_shift")


@dataclass
class Scoring:
    """What a run's scoring keeps between validations: the eval batch (halved on out of memory), its fallbacks, and
    one loader per split and batch (a loader made each time would start --num_workers processes anew)."""
    eval_batch_size: int
    fallbacks: list = field(default_factory=list)
    loaders: dict = field(default_factory=dict)


def score_split(model, name: str, prepared, cfg, accelerator, scoring: Scoring,
                thresholds: dict | None = None) -> tuple[dict, list, dict]:
    """evaluate() on one split at scoring.eval_batch_size. Out of device memory there (its batches are larger than
    training's), again at half the batch, down to 1, and the smaller batch kept for the run's later scoring, each
    fallback recorded; under several processes one line instead (the others wait in a gather)."""
    examples, feats = prepared.features[name]
    dl_kwargs = dataloader_kwargs(cfg, accelerator.device.type == "cuda")
    while True:
        batch = scoring.eval_batch_size
        if (name, batch) not in scoring.loaders:
            scoring.loaders[name, batch] = accelerator.prepare(make_loader(
                feats, batch, False, prepared.tokenizer.pad_token_id, processes=accelerator.num_processes, **dl_kwargs))
        loader = scoring.loaders[name, batch]
        try:
            return evaluate(model, loader, feats, examples, cfg, accelerator, thresholds,
                            desc=None if thresholds is None else f"score {name}")
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            error = f"out of memory scoring {name} with --eval_batch_size {batch} ({first_line(e)[:120]})"
            if batch == 1 or accelerator.num_processes > 1:
                raise UserError(f"{error}: give a smaller --eval_batch_size" if batch > 1 else
                                f"{error}: lower --max_length") from None
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache(garbage_collection=True)  # outside the except: the failed batch's tensors are released
        scoring.eval_batch_size = batch // 2
        scoring.fallbacks.append({"split": name, "eval_batch_size": batch, "to": batch // 2})
        log.warning("%s: scoring it again at --eval_batch_size %d", error, batch // 2)


def test_best(model, prepared, cfg, accelerator, thresholds: dict,
              scoring: Scoring | None = None) -> tuple[dict, dict]:
    """(metrics, predictions) of the best checkpoint on val, test and (when there is one) test_shift, all with the
    thresholds tuned on val."""
    scoring = scoring or Scoring(cfg.eval_batch_size)
    results, all_predictions = {"val": None, "test": None}, {}
    for name in [n for n in SPLITS_SCORED if n in prepared.features]:
        if prepared.features[name][0]:
            results[name], all_predictions[name], _ = score_split(model, name, prepared, cfg, accelerator, scoring,
                                                                  thresholds)
    return results, all_predictions


def metric_names(cfg) -> list[str]:
    """The numbers `evaluate` reports on a split for cfg's task: what --early_stopping_metric can watch.
    Read off the metric functions themselves (on two made-up examples), so the list cannot drift from them."""
    task, metrics = TASKS[cfg.task], {}
    if task.classify:
        metrics.update(classification_metrics([0, 1], [0.2, 0.8]))
    if has_post_pairs(cfg):
        made_up = [{"post_id": "p", "criterion": s, "label": 0} for s in data.SYMPTOMS]
        metrics.update(post_level_metrics(made_up, [0.2] * len(made_up)))
    if task.spans:
        nulls = not task.classify and cfg.include_negatives  # evidence with negatives: also the null-answer scores
        metrics.update(span_metrics(["a", ""], [["a"], []] if nulls else [["a"], ["b"]]))
        metrics.update(sentence_set_metrics([[0]], [[0]]), **ranking_metrics([[0]], [np.zeros(2)]),
                       single_span_sentence_f1=0.0, single_span_set_exact_match=0.0, sentence_threshold=0.0,
                       **{f"{p}_{k}": 0.0 for p in ("multi", "multi_single_span")
                          for k in ("sentence_f1", "set_exact_match")})
    if task.classify and task.spans:
        metrics["combined"] = 0.0
    return [k for k, v in metrics.items() if isinstance(v, float)]


SPLIT_NOTES = {"val": "validation: picked the checkpoint and tuned its thresholds",
               "test": "held-out posts of the same corpus",
               "test_shift": "posts written with phrasing no training post uses (or --test_shift_dir)"}


def summary_table(results: dict, headline: tuple) -> str:
    """A few lines for the end of a run: one row per split (named, with what it is), the task's headline metrics as
    columns; every number is in metrics.json."""
    splits = [n for n in SPLIT_NOTES if results.get(n)]
    keys = [k for k in headline if any(isinstance(results[n].get(k), float) for n in splits)][:6]
    widths = [max(10, len(k) + 2) for k in keys]
    rows = [f"  {'split':<11}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))]
    for n in splits:
        cells = "".join(f"{results[n][k]:>{w}.4f}" if isinstance(results[n].get(k), float) else f"{'-':>{w}}"
                        for k, w in zip(keys, widths))
        rows.append(f"  {n:<11}{cells}   {SPLIT_NOTES[n]}")
    return "\n".join(rows)


def format_metrics(metrics: dict) -> str:
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    lines = [f"  {k:<24} {metrics[k]:.4f}" for k in keys]
    if "confusion_matrix" in metrics:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        lines.append(f"  confusion matrix         tn {tn}  fp {fp}  fn {fn}  tp {tp}")
    for c, f1 in metrics.get("per_criterion_f1", {}).items():
        lines.append(f"  f1 {c:<21} {f1:.4f}")
    return "\n".join(lines)
