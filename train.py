"""Train one task (criteria | evidence | joint) with a hand-written loop wrapped by accelerate.

    python train.py                                        # criteria on the demo corpus, tiny model
    accelerate launch train.py --task evidence             # one process per device the launcher gives
    accelerate launch --multi_gpu --num_processes 2 train.py --task joint   # two gloo processes on CPU
    python train.py --config configs/optimized.yaml --data_dir path/to/redsm5 --model bert-base-uncased
    python train.py --output_dir outputs/run --resume      # continue a killed run from checkpoints/last

A run writes to output_dir: config.yaml, splits.json, metrics.json ({"val", "test"} and "test_shift"
when there is a shifted test set: the demo's held-out phrasing, or --test_shift_dir), predictions.jsonl
(and val_predictions.jsonl, shift_predictions.jsonl), history.json (loss and lr per logged step, validation
metric per epoch), run_stats.json (timings, MLflow run id), checkpoints/best (what evaluate.py loads:
a Hugging Face encoder/ folder, heads.safetensors, a README.md model card), checkpoints/last (for --resume),
and one MLflow run (params, the data as a dataset input, loss and lr per step, validation metrics per epoch,
test metrics per criterion, artifacts).

Reading order: the data, tokenised once per setting -> the optimizer and schedule -> the setup around the loop
-> `train`: the epoch and step loops in one view (forward, which returns the loss; backward; clip; step;
validation) -> testing the best checkpoint and writing the outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections import namedtuple
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
from checkpoint import (
    LoopState,
    load_best,
    load_last,
    load_tokenizer,
    resume_state,
    save_best,
    save_last,
)
from config import DATA_FIELDS, Config, parse_config
from evaluate import evaluate, metric_names
from features import make_loader
from models import TASKS, build_model, build_tokenizer, featurize
from rundir import (
    PREDICTION_FILES,
    check_output_dir,
    check_resume,
    check_resumed_data,
    finish_best,
    resolve_run,
    write_outputs,
    write_run_files,
)
from tracking import TRAIN_LOSS, TRAIN_LR, Tracker, data_sha256, log_run_inputs, tracked_metrics
from utils import (
    UserError,
    dataloader_kwargs,
    make_accelerator,
    output_dir_lock,
    run_main,
    set_seed,
    setup_logging,
    system_info,
    write_jsonl,
    write_text_atomic,
)

log = logging.getLogger("redsm5")

# --------------------------------------------------------------------------- data, tokenised once per setting

# The cache key: the values of every Config field tagged data=True (config.DATA_FIELDS), so a field that
# affects the data cannot be missing from it.
DataKey = namedtuple("DataKey", DATA_FIELDS)
# features: {split: (examples, features)} for train, val, test and, when there is one, test_shift
PreparedData = namedtuple("PreparedData", ["splits", "tokenizer", "features", "report"])
_DATA_CACHE: dict[DataKey, PreparedData] = {}  # reused by every HPO trial in this process


def data_key(cfg: Config) -> DataKey:
    return DataKey(*(getattr(cfg, name) for name in DataKey._fields))


def prepare_data(cfg: Config, saved_tokenizer: Path | None = None) -> PreparedData:
    """Load, split and tokenise; cached per DataKey. A resumed run gives the tokenizer it saved, read back."""
    key = data_key(cfg)
    if key in _DATA_CACHE and saved_tokenizer is None:
        return _DATA_CACHE[key]
    corpus = data.load_corpus_from_config(cfg)
    log.info("\n%s", data.format_report(corpus.report))
    if cfg.splits_file:
        splits = data.load_splits(cfg.splits_file, corpus)
    else:
        splits = data.split_posts(corpus, cfg.seed, cfg.val_ratio, cfg.test_ratio)
    task = TASKS[cfg.task]
    examples = {name: task.examples(corpus, ids, cfg) for name, ids in splits.items()}
    report, shift = corpus.report, data.load_shift_corpus(cfg)
    if shift is not None:  # a separate corpus, scored whole; its features are built like test's
        log.info("test_shift:\n%s", data.format_report(shift.report))
        examples["test_shift"] = task.examples(shift, sorted(shift.posts), cfg)
        report = {**report, "test_shift": shift.report}
    if task.spans:
        log.info("evidence spans usable after alignment (all splits): %s",
                 data.span_usability(corpus, list(corpus.posts)))
    for name in ("train", "val"):
        if not examples[name]:
            raise UserError(f"the {name} split has no examples for task '{cfg.task}' (too little data?)")
    if task.classify and not any(e["label"] for e in examples["train"]):
        log.warning("the train split has no positive example for task '%s' (no evidence annotation kept?): "
                    "the model can only learn 'no'", cfg.task)
    if saved_tokenizer is not None:
        tokenizer = load_tokenizer(saved_tokenizer)
    else:
        train_texts = {corpus.posts[p] for p in splits["train"]} | {e["text"] for e in examples["train"]}
        tokenizer = build_tokenizer(cfg, sorted(train_texts))
    features = {name: (ex, featurize(cfg, tokenizer, ex)) for name, ex in examples.items()}
    _DATA_CACHE.clear()  # one setting at a time: features of big corpora are large
    _DATA_CACHE[key] = PreparedData(splits, tokenizer, features, report)
    return _DATA_CACHE[key]


# --------------------------------------------------------------------------- optimisation

def main_metric(cfg: Config) -> str:
    """The validation metric that picks the best checkpoint (and that HPO optimises)."""
    return TASKS[cfg.task].main_metric if cfg.early_stopping_metric == "auto" else cfg.early_stopping_metric


def step_budget(cfg: Config, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in all). Sized from the per-process batch count and stepped once per
    optimizer step: right under gradient accumulation and any number of processes."""
    per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    return per_epoch, per_epoch * cfg.epochs if cfg.max_steps <= 0 else min(cfg.max_steps, per_epoch * cfg.epochs)


def make_optimizer(model, cfg: Config):
    """AdamW with four parameter groups: the encoder(s) at lr, the randomly initialised heads at head_lr, each split
    into weights with weight decay and biases / normalisation weights without."""
    groups = {(head, decay): [] for head in (False, True) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = not name.split(".")[0].endswith("encoder")  # encoder.*, span_encoder.*: the rest are heads
            groups[head, not (p.ndim < 2 or "norm" in name.lower())].append(p)
    param_groups = [{"params": params, "lr": cfg.head_lr if head and cfg.head_lr is not None else cfg.lr,
                     "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{'heads' if head else 'encoder'}"
                     f"{'' if decay else ', no decay'}"} for (head, decay), params in groups.items() if params]
    # fused: one kernel over all tensors (CPU and CUDA); 4.5x faster than the per-tensor loop (bench.py)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=True)


def make_scheduler(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def make_class_weights(cfg: Config, train_features: list[dict]) -> torch.Tensor | None:
    """Inverse class frequencies of the training inputs, when asked (classification tasks only)."""
    if not (cfg.class_weights and TASKS[cfg.task].classify):
        return None
    labels = np.concatenate([np.ravel(f["label"]) for f in train_features])
    counts = np.bincount(labels[labels >= 0], minlength=2).clip(min=1)  # -100: not a pair (--encoding post)
    return torch.tensor(counts.sum() / (2 * counts), dtype=torch.float)


def improves(best: float | None, value: float, cfg: Config) -> bool:
    sign = 1 if cfg.early_stopping_mode == "max" else -1
    return best is None or sign * (value - best) > cfg.min_delta


# --------------------------------------------------------------------------- setup around the loop

def setup_process(cfg: Config, accelerator):
    """The accelerator (made here unless given), CPU threads and seeds; the watched metric checked before any
    training (a wrong --early_stopping_metric would otherwise surface after the first epoch)."""
    if main_metric(cfg) not in metric_names(cfg):
        raise UserError(f"--early_stopping_metric: '{main_metric(cfg)}' is not a {cfg.task} metric "
                        f"(choose from {', '.join(metric_names(cfg))})")
    if accelerator is None:
        accelerator = make_accelerator(cfg)
    else:
        accelerator.gradient_accumulation_steps = cfg.grad_accum
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed, cfg.deterministic, cfg.cudnn_benchmark)
    return accelerator


RUN_RECORD = "run.json"  # what a run trains on, by content: what --resume compares before it continues
def start_run(cfg: Config, accelerator, out_dir: Path, resuming: bool) -> tuple[PreparedData, str]:
    """(prepared data, data digest): checked against the run's record on --resume, recorded for a new run."""
    if resuming:  # every process checks, so that all stop together
        record = check_resume(cfg, out_dir)
        data_digest = record["data_sha256"]
        prepared = prepare_data(cfg, saved_tokenizer=out_dir / "tokenizer")
        check_resumed_data(prepared, out_dir, record)
    else:
        prepared, data_digest = prepare_data(cfg), data_sha256(cfg)
        if accelerator.is_main_process:
            write_run_files(cfg, prepared, out_dir, data_digest)
    sizes = [len(x) for name in ("train", "val", "test") for x in prepared.features[name]]
    log.info("task %s: %d train / %d val / %d test examples (%d / %d / %d model inputs)", cfg.task, *sizes[::2],
             *sizes[1::2])
    return prepared, data_digest


def build_training(cfg: Config, accelerator, prepared: PreparedData) -> tuple:
    """(model, optimizer, scheduler, train loader, val loader, total optimizer steps), prepared by accelerate."""
    train_features = prepared.features["train"][1]
    model = build_model(cfg, prepared.tokenizer, make_class_weights(cfg, train_features))
    dl_kwargs, pad = dataloader_kwargs(cfg, accelerator.device.type == "cuda"), prepared.tokenizer.pad_token_id
    train_loader = make_loader(train_features, cfg.batch_size, True, pad, cfg.seed, **dl_kwargs)
    val_loader = make_loader(prepared.features["val"][1], cfg.eval_batch_size, False, pad, **dl_kwargs)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, make_optimizer(model, cfg), train_loader,
                                                                     val_loader)
    _, total_steps = step_budget(cfg, len(train_loader))
    return model, optimizer, make_scheduler(cfg, optimizer, total_steps), train_loader, val_loader, total_steps


def log_losses(pending: list, state: LoopState, tracker: Tracker, progress) -> None:
    """Move the pending (step, loss, lr) to the host in one sync; a non-finite loss stops the run naming its step."""
    losses = torch.stack([loss for _, loss, _ in pending]).float().cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        raise UserError(f"loss became {losses[bad[0]]} at step {pending[bad[0]][0]}: lower --lr, "
                        "keep --max_grad_norm on, or check the data")
    for (step, _, lr), loss in zip(pending, losses):
        tracker.log_metrics({TRAIN_LOSS: float(loss), TRAIN_LR: lr}, step=step)
        state.curve.append([step, float(loss), lr])
    progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][2]:.2e}")


# --------------------------------------------------------------------------- the run

def train(cfg: Config, accelerator=None, on_validation=None, parent_run_id: str | None = None) -> dict:
    """Train, validate each epoch, keep the best checkpoint, test it. Returns {"val", "test", ["test_shift",]
    "train"}. `on_validation(epoch, val_metrics)` is called after every validation (HPO prunes there).
    `parent_run_id` nests this run's MLflow run under another (an HPO study, a cross-validation).
    A run that raises is ended in MLflow as KILLED (Ctrl-C) or FAILED, not left RUNNING.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    t_start, metric_name = time.perf_counter(), main_metric(cfg)
    accelerator = setup_process(cfg, accelerator)
    cfg = resolve_run(cfg, accelerator)
    out_dir = Path(cfg.output_dir)
    best_dir, last_dir = out_dir / "checkpoints" / "best", out_dir / "checkpoints" / "last"
    with contextlib.ExitStack() as run_scope:  # the lock, then the MLflow run: released / ended however we leave
        run_scope.enter_context(output_dir_lock(out_dir, accelerator.is_main_process))
        check_output_dir(cfg, out_dir, accelerator)
        accelerator.wait_for_everyone()
        resume_from = load_last(last_dir) if cfg.resume else None
        prepared, data_digest = start_run(cfg, accelerator, out_dir, resuming=resume_from is not None)
        # the training corpus alone, by content: evaluate.py --data_dir tells it from another corpus by this
        corpus_digest = data_sha256(dataclasses.replace(cfg, test_shift_dir=None, splits_file=None)) \
            if cfg.test_shift_dir or cfg.splits_file else data_digest
        model, optimizer, scheduler, train_loader, val_loader, total_steps = build_training(cfg, accelerator,
                                                                                           prepared)
        state = resume_state(accelerator, scheduler, resume_from, cfg) if resume_from else LoopState()
        tracker = run_scope.enter_context(Tracker(cfg, accelerator.is_main_process, run_id=state.run_id,
                                                  parent_run_id=parent_run_id))
        state.run_id = tracker.run_id
        if not resume_from:
            log_run_inputs(tracker, cfg, prepared.report, data_digest)
        log.info("run folder %s; %s", out_dir, tracker.where())
        # log lines go above the bar, not into it; no bar (its \r frames) where stderr is a file: a line instead
        run_scope.enter_context(logging_redirect_tqdm())
        bar = accelerator.is_main_process and sys.stderr.isatty()
        progress = run_scope.enter_context(tqdm(total=total_steps, initial=state.global_step, desc=f"train {cfg.task}",
                                                mininterval=2, disable=not bar))
        last_line = time.perf_counter()
        micro_losses, pending = [], []  # losses of the optimizer step under way; (step, loss, lr) not yet logged
        samples, first_step_s = 0, None
        t_train, stop = time.perf_counter(), state.global_step >= total_steps
        model.train()
        while not stop and state.epoch < cfg.epochs:
            epoch = state.epoch
            train_loader.set_epoch(epoch)  # accelerate's loader passes it on to our sampler at each new iterator
            batches = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done \
                else train_loader
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch)["loss"]
                    # every process must agree, or DDP would wait for the skipped backward: a sync per step, only
                    # when asked
                    if cfg.skip_nonfinite and accelerator.gather(~torch.isfinite(loss.detach()).reshape(1)).any():
                        log.warning("loss %s: step skipped", loss.item())
                        state.skipped_steps += 1
                    else:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        micro_losses.append(loss.detach())
                    optimizer.zero_grad(set_to_none=True)
                state.batches_done += 1
                samples += len(batch["input_ids"])
                if not accelerator.sync_gradients:  # inside a gradient accumulation
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                state.global_step += 1
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_start
                    log.info("first optimizer step %.1f s after start", first_step_s)
                if micro_losses:
                    pending.append((state.global_step, torch.stack(micro_losses).mean(), lr))
                micro_losses = []
                if pending and (state.global_step % cfg.log_every == 0 or state.global_step == total_steps):
                    log_losses(pending, state, tracker, progress)  # one host sync per log_every steps
                    pending = []
                    if not bar and time.perf_counter() - last_line > 30:  # a log file gets a line every 30 s
                        last_line = time.perf_counter()
                        log.info("step %d/%d: loss %.4f, lr %.2e", *state.curve[-1][:1], total_steps,
                                 *state.curve[-1][1:])
                progress.update(1)
                if cfg.save_every and state.global_step % cfg.save_every == 0 and state.global_step < total_steps:
                    tracker.flush()  # the MLflow history of a resumed run then has no hole
                    save_last(accelerator, last_dir, state, scheduler, cfg.keep_checkpoints)
                if state.global_step >= total_steps:
                    break
            budget_spent = state.global_step >= total_steps
            if not (budget_spent and state.batches_done < len(train_loader)):  # the epoch ran to its end
                state.epoch, state.batches_done = epoch + 1, 0

            # validation; the thresholds tuned on it (null answer, evidence sentences, per symptom) go with the best
            val_examples, val_features = prepared.features["val"]
            metrics, _, thresholds = evaluate(model, val_loader, val_features, val_examples, cfg, accelerator)
            value = metrics[metric_name]
            state.history.append({"epoch": epoch, "step": state.global_step, metric_name: value})
            headline = (metric_name, *TASKS[cfg.task].headline)
            tracker.log_metrics(tracked_metrics(metrics, "val", headline), step=state.global_step, flush=True)
            log.info("epoch %d step %d: val %s %.4f", epoch, state.global_step, metric_name, value)
            if on_validation:
                on_validation(epoch, metrics)
            if improves(state.best, value, cfg):
                state.best, state.bad_epochs, state.thresholds = value, 0, thresholds
                info = {"thresholds": thresholds, "epoch": epoch, "step": state.global_step, metric_name: value,
                        "val_metrics": metrics, "corpus_sha256": corpus_digest}
                save_best(accelerator, model, prepared.tokenizer, cfg, best_dir, info, prepared.splits)
            else:
                state.bad_epochs += 1
            accelerator.wait_for_everyone()
            model.train()  # evaluate() left it in eval mode
            stop = budget_spent or (cfg.patience > 0 and state.bad_epochs >= cfg.patience)
            if stop and not budget_spent:
                log.info("early stopping after epoch %d: val %s has not improved by more than %g for %d epochs "
                         "(best %.4f)", epoch, metric_name, cfg.min_delta, state.bad_epochs, state.best)
            tracker.flush()
            save_last(accelerator, last_dir, state, scheduler, cfg.keep_checkpoints)
        progress.close()
        train_s = time.perf_counter() - t_train

        load_best(accelerator, model, best_dir)
        results, predictions = test_best(model, prepared, cfg, accelerator, state.thresholds, out_dir)
        results["train"] = {"steps": state.global_step, "epochs_completed": state.epoch, "train_seconds": train_s,
                            "samples_per_second": samples * accelerator.num_processes / max(train_s, 1e-9),
                            "seconds_to_first_step": first_step_s, "processes": accelerator.num_processes,
                            "skipped_nonfinite_steps": state.skipped_steps, "mlflow_run_id": tracker.run_id,
                            "resumed": resume_from is not None,
                            "ran_with": {"device": accelerator.device.type, "mixed_precision": cfg.mixed_precision,
                                         "distributed_type": accelerator.distributed_type.name,
                                         "tf32": accelerator.device.type == "cuda" and cfg.tf32}}
        if accelerator.is_main_process:
            write_outputs(out_dir, cfg, results, predictions, state, metric_name, tracker)
            finish_best(best_dir, cfg, results, prepared.splits, tracker)
            tracker.flush()  # what MLflow did not get is known only now
            results["train"].update(tracker.unlogged())
            write_text_atomic(out_dir / "run_stats.json", json.dumps({**results["train"], "system": system_info()},
                                                                     indent=2))
            tracker.log_artifact(out_dir / "run_stats.json")
            log.info("done: %s (metrics.json, predictions.jsonl, checkpoints/best); %s", out_dir, tracker.where())
    return results


# --------------------------------------------------------------------------- test and outputs

def test_best(model, prepared: PreparedData, cfg: Config, accelerator, thresholds: dict,
              out_dir: Path) -> tuple[dict, dict]:
    """(metrics, predictions) of the best checkpoint on val, test and (when there is one) test_shift, all with the
    thresholds tuned on val; the predictions also written as JSONL."""
    results, all_predictions = {"val": None, "test": None}, {}
    dl_kwargs = dataloader_kwargs(cfg, accelerator.device.type == "cuda")
    for name in [n for n in PREDICTION_FILES if n in prepared.features]:
        examples, feats = prepared.features[name]
        if not examples:
            continue
        loader = accelerator.prepare(make_loader(feats, cfg.eval_batch_size, False,
                                                      prepared.tokenizer.pad_token_id, **dl_kwargs))
        metrics, predictions, _ = evaluate(model, loader, feats, examples, cfg, accelerator, thresholds,
                                           desc=f"score {name}")
        results[name], all_predictions[name] = metrics, predictions
        if accelerator.is_main_process:  # validation predictions too: report.py chooses its decision threshold on them
            write_jsonl(predictions, out_dir / PREDICTION_FILES[name])
    return results, all_predictions


def main(argv=None):
    cfg, _ = parse_config(argv, prog="train.py", doc=__doc__)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    changed = {k: v for k, v in asdict(cfg).items() if v != getattr(Config, k)}
    log.info("config (non-default fields): %s", changed)
    train(cfg, accelerator)


if __name__ == "__main__":
    run_main(main)
