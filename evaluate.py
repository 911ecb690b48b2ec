"""Evaluate a checkpoint on a split, or predict on new posts (the scoring itself: scoring.py).

    python evaluate.py --checkpoint outputs/run/checkpoints/best [--data_dir DIR] [--split test] [--output FILE]
    python evaluate.py --checkpoint outputs/run/checkpoints/best --predict posts.csv --output predictions.jsonl
    python evaluate.py --checkpoint outputs/run/checkpoints/best --html errors.html   # the split's errors, worst first
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --checkpoint ...   # same numbers, two processes

Reading order: `model_outputs` runs a model over a loader (gathered across processes exactly once) ->
scoring the classification and the evidence of each (criterion, post) pair (metrics.py, decoding.py) ->
`evaluate` -> the command line, and `predict_file` for new posts: a chunk at a time, each scored by `predict_posts`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections import Counter, deque
from pathlib import Path

import data
from checkpoint import load_checkpoint, resolve_checkpoint
from cli import Parser
from config import sentence_unit
from errorpage import write_error_page
from features import make_loader, read_tokens
from files import check_writable, write_jsonl, write_text_atomic
from models import TASKS, featurize
from scoring import evaluate, format_metrics
from splits import load_splits
from utils import UserError, dataloader_kwargs, dumps, make_accelerator, out_of_memory_as_error, run_main, setup_logging

log = logging.getLogger("redsm5")


# --------------------------------------------------------------------------- command line

def main(argv=None):
    parser = Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/best folder of a run")
    parser.add_argument("--data_dir", help="ReDSM5 folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "test_shift"],
                        help="test_shift: the shifted corpus of the run (demo held-out phrasing or test_shift_dir)")
    parser.add_argument("--predict", metavar="POSTS_CSV", help="predict on new posts (post_id,text) instead")
    parser.add_argument("--output", help="where to write the metrics JSON (or the predictions JSONL)")
    parser.add_argument("--batch_size", type=int, help="evaluation batch size (default: the run's)")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML page of the split's posts, the worst "
                        "errors first: gold and predicted symptoms and evidence sentences (errorpage.py)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size: must be >= 1, got {args.batch_size}")
    output = args.output or ("predictions.jsonl" if args.predict else None)
    if args.html is not None and args.predict:
        raise UserError("--html: the error page compares predictions with gold labels, which new posts (--predict) "
                        "do not have; give --split instead")
    for flag, path in (("--output", output), ("--html", args.html)):
        if path is not None:
            check_writable(path, flag)  # before the model is loaded and run, not after
            check_not_an_input(path, args, flag)
    if output is not None and args.html is not None and Path(output).resolve() == Path(args.html).resolve():
        raise UserError(f"--html {args.html}: is also the --output file; give another file")
    accelerator = make_accelerator()
    setup_logging(accelerator.is_main_process)
    if args.predict:
        check_posts_file(Path(args.predict))  # a bad file fails before the model loads
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, tokenizer, cfg, extra = load_checkpoint(checkpoint)
    if args.batch_size is not None:
        cfg.eval_batch_size = args.batch_size
    task = TASKS[cfg.task]
    memory = f"scoring at --batch_size {cfg.eval_batch_size}", "give a smaller --batch_size"  # if it runs out
    if args.predict:
        with out_of_memory_as_error(*memory):
            rows = predict_file(model, tokenizer, cfg, extra, Path(args.predict), accelerator)
            if accelerator.is_main_process:
                n_rows = write_jsonl(rows, output)  # whole or not at all: a temp file, then os.replace
                log.info("wrote %d predictions to %s", n_rows, output)
            else:
                deque(rows, maxlen=0)  # every process scores its share of each chunk
        return
    corpus, post_ids, scored = split_posts_of(cfg, checkpoint, args.split, args.data_dir, extra.get("corpus_sha256"))
    examples = task.examples(corpus, post_ids, cfg)
    if not examples:
        raise UserError(f"split '{args.split}' has no examples for task {cfg.task}")
    features = featurize(cfg, tokenizer, examples)
    loader = make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id,
                         processes=accelerator.num_processes,
                         **dataloader_kwargs(cfg, accelerator.device.type == "cuda"))
    model, loader = accelerator.prepare(model, loader)
    with out_of_memory_as_error(*memory):
        metrics, predictions, _ = evaluate(model, loader, features, examples, cfg, accelerator, saved_thresholds(extra))
    if accelerator.is_main_process:
        log.info("%s on %s (%d posts, %d examples, %d processes):\n%s", cfg.task, scored, len(post_ids),
                 len(examples), accelerator.num_processes, format_metrics(metrics))
        if args.output:  # whole or not at all, like the predictions
            write_text_atomic(Path(args.output), dumps({scored: metrics}, indent=2))
        if args.html:
            posts = {"all": "all posts of --data_dir", "unseen": "the unseen posts of --data_dir"}.get(
                scored, f"the {scored} split")
            write_error_page(Path(args.html), predictions, examples, metrics, f"{cfg.task}: errors on {posts}, "
                             f"checkpoint {checkpoint}")
            log.info("wrote the error page %s", args.html)


def check_not_an_input(output: str, args, flag: str = "--output") -> None:
    """An output (--output, --html) must not be a file this command reads (the --predict CSV, a file of the
    checkpoint or of --data_dir): it would be replaced by what is written."""
    if not Path(output).is_file():
        return
    inputs = [("--predict", Path(args.predict))] if args.predict else []
    for name in ("checkpoint", "data_dir"):
        folder = getattr(args, name)
        if folder is not None and Path(folder).is_dir():
            inputs += [(f"--{name}", f) for f in Path(folder).rglob("*") if f.is_file()]
    for source, f in inputs:
        if f.is_file() and os.path.samefile(output, f):
            raise UserError(f"{flag} {output}: is the {source} file {f} that this command reads, and writing would "
                            "replace it; give another file")


def saved_thresholds(extra: dict) -> dict:
    """The thresholds tuned on validation, from a checkpoint's checkpoint.json."""
    return dict(extra.get("thresholds") or {})


def split_posts_of(cfg, checkpoint: Path, split: str, data_dir=None, trained_on: str | None = None) -> tuple:
    """(corpus, post ids, what was scored) of a split of the run: from its saved splits.json, or test_shift: every
    post of its shifted corpus (--data_dir then names that corpus). A --data_dir that is not the corpus the model
    was trained on (its content digest, `trained_on`, differs) is scored whole: no post of it was trained on, and
    the run's split lists other posts; but a post whose id the model trained or validated on (its splits.json) is
    never scored as new, whatever the digest says (a copy of the training corpus, rewritten)."""
    if split == "test_shift":
        shift_cfg = cfg if data_dir is None else dataclasses.replace(cfg, test_shift_dir=data_dir)
        corpus = data.load_shift_corpus(shift_cfg)
        if corpus is None:
            raise UserError("--split test_shift: this run has no shifted test set (no test_shift_dir, and not the "
                            "demo with demo_shift_posts > 0); give it as --data_dir")
        log.info("\n%s", data.format_report(corpus.report))
        return corpus, sorted(corpus.posts), "test_shift"
    corpus = data.load_corpus_from_config(cfg, data_dir if data_dir is not None else cfg.data_dir)
    log.info("\n%s", data.format_report(corpus.report))
    if data_dir is not None and not same_corpus(cfg, data_dir, trained_on):
        saved = json.loads((checkpoint / "splits.json").read_text()) if (checkpoint / "splits.json").is_file() else {}
        seen = set(saved.get("train", [])) | set(saved.get("val", []))
        post_ids = sorted(set(corpus.posts) - seen)
        if not post_ids:
            raise UserError(f"--data_dir {data_dir}: every post has an id the model trained or validated on (its "
                            "splits.json): nothing new to score; without --data_dir the run's test split is scored")
        if len(post_ids) < len(corpus.posts):
            log.warning("%s: %d of its %d posts have ids the model trained or validated on (its splits.json): left "
                        "out; scoring the other %d", data_dir, len(corpus.posts) - len(post_ids), len(corpus.posts),
                        len(post_ids))
            return corpus, post_ids, "unseen"
        log.info("%s is not the corpus this model was trained on: scoring all %d of its posts", data_dir,
                 len(corpus.posts))
        return corpus, post_ids, "all"
    post_ids = load_splits(checkpoint / "splits.json", corpus)[split]
    log.info("scoring the %s split of the training run: %d of the corpus's %d posts (another labelled corpus: "
             "--data_dir)", split, len(post_ids), len(corpus.posts))
    return corpus, post_ids, split


def same_corpus(cfg, data_dir, trained_on: str | None) -> bool:
    """Whether --data_dir holds the corpus the model was trained on: by content (the digest the checkpoint
    recorded), else, for a checkpoint without one, by the folder it points to."""
    if trained_on is not None:
        return data.data_sha256(dataclasses.replace(cfg, data_dir=str(data_dir), test_shift_dir=None,
                                               splits_file=None)) == trained_on
    return cfg.data_dir is not None and os.path.realpath(cfg.data_dir) == os.path.realpath(data_dir)


# --predict reads, scores and writes this many posts at a time, fewer where their texts reach PREDICT_CHUNK_CHARS (a
# long post's windows weigh more): its memory is flat in the file's length
PREDICT_CHUNK_POSTS, PREDICT_CHUNK_CHARS = 512, 2_000_000


def usable_posts(rows, where: str, skipped: Counter, error=UserError):
    """(post_id, text) of the rows (line or None, post_id, text) given to predict on (a --predict CSV, a served
    DataFrame), in their order: ids stripped; a post_id twice is an error (predictions are keyed by it); a row
    without an id or a visible text (data.visible: as training drops it) is skipped and counted in `skipped`."""
    first = {}
    for line, pid, text in rows:
        pid = "" if pid is None else str(pid).strip()
        if not pid:
            skipped["without post_id"] += 1
            continue
        if pid in first:
            at = f" on line {first[pid]} and again on line {line}" if line else " twice"
            raise error(f"{where}: post_id '{pid}'{at} (predictions are keyed by post_id: give each post its own)")
        first[pid] = line
        if isinstance(text, str) and data.visible(text):
            yield pid, text
        else:
            skipped["with an empty text or only invisible characters"] += 1


def report_skipped(where: str, n_posts: int, skipped: Counter, error=UserError) -> None:
    """One warning counting the rows usable_posts skipped; none left to predict on is an error."""
    no_id, no_text = skipped["without post_id"], skipped["with an empty text or only invisible characters"]
    if not n_posts:
        raise error(f"{where}: no row has both a post_id and a visible text ({no_id} without post_id, {no_text} "
                    "with an empty text or only invisible characters)")
    if no_id or no_text:
        log.warning("%s: %d rows skipped, not predicted: %d without post_id, %d with an empty text or only invisible "
                    "characters (zero-width, bidi marks, controls)", where, no_id + no_text, no_id, no_text)


def posts_to_predict(rows, where: str, error=UserError) -> dict[str, str]:
    """post_id -> text of (post_id, text) rows held whole (a served DataFrame): usable_posts, then report_skipped."""
    skipped = Counter()
    posts = dict(usable_posts(((None, pid, text) for pid, text in rows), where, skipped, error))
    report_skipped(where, len(posts), skipped, error)
    return posts


def file_posts(path: Path, skipped: Counter):
    """usable_posts of a --predict CSV (a header, the columns post_id and text), read as it goes, never whole."""
    records = data.stream_csv(path, data.POST_COLUMNS)
    yield from usable_posts(((line, r["post_id"], r["text"]) for line, r in records), str(path), skipped)


def check_posts_file(path: Path) -> int:
    """The number of posts of a --predict CSV to predict on, read through once before the model loads: a bad file
    (its structure, a post_id twice, no usable row) fails first, and what is skipped is counted in one warning."""
    skipped, n_posts = Counter(), 0
    for _ in file_posts(path, skipped):
        n_posts += 1
    if not n_posts and not skipped:
        raise UserError(f"{path}: no posts (a header and no rows)")
    report_skipped(str(path), n_posts, skipped)
    return n_posts


def post_chunks(path: Path, chunk_posts: int | None = None):
    """The posts of a --predict CSV (file_posts, post_id -> text), `chunk_posts` (default PREDICT_CHUNK_POSTS) at a
    time, fewer where their texts reach PREDICT_CHUNK_CHARS."""
    chunk, chars, chunk_posts = {}, 0, chunk_posts or PREDICT_CHUNK_POSTS
    for pid, text in file_posts(path, Counter()):  # check_posts_file counted what is skipped here
        chunk[pid], chars = text, chars + len(text)
        if len(chunk) == chunk_posts or chars >= PREDICT_CHUNK_CHARS:
            yield chunk
            chunk, chars = {}, 0
    if chunk:
        yield chunk


def predict_file(model, tokenizer, cfg, extra, path: Path, accelerator, chunk_posts: int | None = None):
    """The rows of predict_posts for every post of a --predict CSV, in its order, a chunk of posts at a time: each
    chunk read, featurized, scored and its rows handed on before the next is read, so memory stays flat whatever the
    file's length (read whole, 20,000 posts took 4.9 GB; now 1.0 GB: results/2026-12-06_reliability-fourth-pass-b.md).
    Batches of one shape make the rows those of a single chunk, bit for bit. The posts the model's tokenizer reads no
    token in are counted in one warning."""
    model, skipped, n_rows = accelerator.prepare(model), Counter(), 0  # the model once; each chunk's loader beside it
    for chunk in post_chunks(path, chunk_posts):
        rows = predict_posts(model, tokenizer, cfg, extra, chunk, accelerator, skipped, one_shape=True)
        n_rows += len(rows)
        yield from rows
        accelerator.free_memory()  # prepare() keeps every loader it saw, and with it the chunk's features
    report_tokenless(str(path), skipped["no token"], n_rows)


def report_tokenless(where: str, n_posts: int, n_rows: int, error=UserError) -> None:
    """One warning counting the posts the model's tokenizer reads no token in; nothing predicted is an error."""
    if not n_rows:
        raise error(f"{where}: the model's tokenizer reads no token in any of its posts (only characters it drops): "
                    "nothing to predict")
    if n_posts:
        log.warning("%s: %d posts skipped, not predicted: the model's tokenizer reads no token in them (only "
                    "characters it drops)", where, n_posts)


def predict_posts(model, tokenizer, cfg, extra, posts: dict[str, str], accelerator, skipped: Counter,
                  one_shape: bool = False) -> list[dict]:
    """Per post (post_id -> text) and criterion: probability and decisions (criteria --unit post, joint: `pred` at 0.5,
    `pred_tuned` at `threshold_tuned`, the symptom's threshold chosen on validation) and the evidence sentences
    (evidence; joint only where a decision calls the criterion present). A post the tokenizer reads no token in
    (features.read_tokens) is never scored: it is counted in `skipped["no token"]`.

    With `one_shape`, every batch is eval_batch_size windows of max_length tokens: a post's numbers are then its own,
    bit for bit, whatever posts are read beside it (CPU kernels change the last bits with a batch's shape). It costs
    the padding (--predict: a fifth more time on the demo); a served request of one post does without it.

    A criteria model of --unit sentence is refused: it learned the status of annotated (criterion, sentence) pairs
    and never met a post's other sentences, so scoring every sentence of a new post says "present" almost everywhere
    (results/2026-12-06_predict-and-newcomer.md)."""
    if sentence_unit(cfg):
        raise UserError("--predict: this checkpoint is a criteria model of --unit sentence: it classifies annotated "
                        "(criterion, sentence) pairs and was never trained on a post's other sentences, so it cannot "
                        "score new posts; train --task criteria --unit post (or --task joint) for post predictions")
    read = read_tokens(tokenizer, list(posts.values()))
    if not all(read):
        skipped["no token"] += read.count(False)
        posts = {pid: text for (pid, text), r in zip(posts.items(), read) if r}
    if not posts:
        return []
    examples = [{"post_id": pid, "criterion": symptom, "text": text, "label": 0, "spans": []}
                for pid, text in posts.items() for symptom in data.SYMPTOMS]
    features = featurize(cfg, tokenizer, examples)
    loader = make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id,
                         width=cfg.max_length if one_shape else None, processes=accelerator.num_processes)
    model, loader = accelerator.prepare(model, loader)
    _, preds, _ = evaluate(model, loader, features, examples, cfg, accelerator, saved_thresholds(extra))
    rows, tuned = [], saved_thresholds(extra).get("paper_thresholds") or {}
    for ex, p in zip(examples, preds):
        row = {"post_id": ex["post_id"], "criterion": ex["criterion"]}
        for k in ("prob", "pred"):
            if k in p:
                row[k] = p[k]
        if "prob" in p and tuned:  # at the symptom's threshold chosen on validation (post-level tasks)
            row.update(threshold_tuned=tuned[ex["criterion"]], pred_tuned=int(p["prob"] >= tuned[ex["criterion"]]))
        # evidence: every pair; joint: the pairs that either decision (0.5, or the tuned threshold) calls present
        present = row.get("pred", 1) or row.get("pred_tuned", 0)
        if "pred_text" in p and present:
            row.update(evidence_text=p["pred_text"], evidence_start=p["pred_start"], evidence_end=p["pred_end"],
                       span_score=p["span_score"], null_score=p["null_score"],
                       evidence_sentences=p["pred_sentence_spans"], evidence_sentence_texts=p["pred_sentence_texts"])
        rows.append(row)
    return rows


if __name__ == "__main__":
    run_main(main)
