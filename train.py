"""Train one task (criteria | evidence | joint) with a hand-written loop wrapped by accelerate.

    python train.py                                        # criteria on the demo corpus, tiny model
    accelerate launch train.py --task evidence             # one process per device the launcher gives
    accelerate launch --multi_gpu --num_processes 2 train.py --task joint   # two gloo processes on CPU
    python train.py --config configs/optimized.yaml --data_dir path/to/redsm5 --model bert-base-uncased
    python train.py --output_dir outputs/run --resume      # continue a killed run from checkpoints/last

This file is the training path alone: the data, tokenised once -> the optimizer and schedule -> `train_step`
(forward, which returns the loss; backward; clip; step) -> `train`, the epoch loop around it with validation
(each epoch, or every --eval_every steps), the best checkpoint and its test; a SIGTERM stops it at a step boundary.
It tracks and records nothing but through the hooks its caller gives: runner.py makes it a run (the output folder
and its lock, resume, MLflow, the files a run leaves, listed there), and `main` below is that run from the command
line.
"""
from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data
from auto_defaults import auto_lr, changed_fields
from checkpoint import LoopState, load_best, load_tokenizer, resume_state, save_best
from cli import parse_config
from config import Config
from features import make_loader, per_process_batch
from models import TASKS, build_model, build_tokenizer, featurize
from scoring import Scoring, metric_names, score_split, test_best
from splits import load_splits, split_posts
from utils import (
    STEP_BOUNDARY,
    Terminated,
    UserError,
    dataloader_kwargs,
    first_line,
    make_accelerator,
    out_of_memory,
    run_main,
    set_seed,
    setup_logging,
)

log = logging.getLogger("redsm5")

# --------------------------------------------------------------------------- data, tokenised once

# features: {split: (examples, features)} for train, val, test and, when there is one, test_shift
PreparedData = namedtuple("PreparedData", ["splits", "tokenizer", "features", "report"])


def prepare_data(cfg: Config, saved_tokenizer: Path | None = None) -> PreparedData:
    """Load, split and tokenise. A resumed run gives the tokenizer it saved, read back."""
    corpus = data.load_corpus_from_config(cfg)
    log.info("\n%s", data.format_report(corpus.report))
    if cfg.splits_file:
        splits = load_splits(cfg.splits_file, corpus)
    else:
        splits = split_posts(corpus, cfg.seed, cfg.val_ratio, cfg.test_ratio)
    task = TASKS[cfg.task]
    examples = {name: task.examples(corpus, ids, cfg) for name, ids in splits.items()}
    report, shift = corpus.report, data.load_shift_corpus(cfg, corpus)
    if shift is not None:  # a separate corpus, scored whole; its features are built like test's
        log.info("test_shift:\n%s", data.format_report(shift.report))
        examples["test_shift"] = task.examples(shift, sorted(shift.posts), cfg)
        report = {**report, "test_shift": shift.report}
        if not examples["test_shift"]:  # its featurizing raised an IndexError deep in the tokenizer
            log.warning("test_shift: no examples for task '%s' (no annotation kept?): not scored", cfg.task)
            del examples["test_shift"]
    if task.spans:
        log.info("evidence spans usable after alignment (all splits): %s",
                 data.span_usability(corpus, list(corpus.posts)))
    for name in ("train", "val"):
        if not examples[name]:
            raise UserError(f"the {name} split has no examples for task '{cfg.task}' (too little data?)")
    advice = {"test": "raise --test_ratio, or give a --splits_file with other test posts",
              "test_shift": "give a --test_shift_dir whose posts have what the task reads"}
    for name in [n for n in advice if n in examples and not examples[n]]:  # the model is still trained and validated
        log.warning("the %s split has no examples for task '%s' (none of its posts has what the task reads): it is not "
                    "scored (no %s metrics or predictions); for a score, %s", name, cfg.task, name, advice[name])
    if task.classify and not any(e["label"] for e in examples["train"]):
        log.warning("the train split has no positive example for task '%s' (no evidence annotation kept?): "
                    "the model can only learn 'no'", cfg.task)
    if saved_tokenizer is not None:
        tokenizer = load_tokenizer(saved_tokenizer)
    else:
        train_texts = {corpus.posts[p] for p in splits["train"]} | {e["text"] for e in examples["train"]}
        tokenizer = build_tokenizer(cfg, sorted(train_texts))
    features = {name: (ex, featurize(cfg, tokenizer, ex)) for name, ex in examples.items()}
    return PreparedData(splits, tokenizer, features, report)


# --------------------------------------------------------------------------- optimisation

def main_metric(cfg: Config) -> str:
    """The validation metric that picks the best checkpoint (and that HPO optimises)."""
    return TASKS[cfg.task].main_metric if cfg.early_stopping_metric == "auto" else cfg.early_stopping_metric


def step_budget(cfg: Config, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in all). Sized from the per-process batch count and stepped once per
    optimizer step: right under gradient accumulation and any number of processes."""
    per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    return per_epoch, per_epoch * cfg.epochs if cfg.max_steps <= 0 else min(cfg.max_steps, per_epoch * cfg.epochs)


def layer_depth(name: str, n_layers: int) -> int:
    """Where an encoder parameter sits for --layer_decay: 0 the embeddings, l for layer l (1..L), L + 1 above the
    last layer (a final norm)."""
    if "embed" in name:
        return 0
    found = re.search(r"\.layers?\.(\d+)\.", name)
    return int(found.group(1)) + 1 if found else n_layers + 1


def make_optimizer(model, cfg: Config):
    """AdamW with four parameter groups: the encoder(s) at lr, the randomly initialised heads at head_lr, each split
    into weights with weight decay and biases / normalisation weights without. With --layer_decay < 1 the encoder's
    groups are split further by depth, each layer at lr * layer_decay ** (L - l) (embeddings: ** L)."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = not name.split(".")[0].endswith("encoder")  # encoder.*, span_encoder.*: the rest are heads
            depth = None
            if not head and cfg.layer_decay < 1:
                n_layers = getattr(model, name.split(".")[0]).config.num_hidden_layers
                depth = min(n_layers, layer_depth(name, n_layers)), n_layers
            groups.setdefault((head, not (p.ndim < 2 or "norm" in name.lower()), depth), []).append(p)
    param_groups = []
    for (head, decay, depth), params in sorted(groups.items(), key=lambda g: (g[0][0], g[0][2] or (0, 0), not g[0][1])):
        lr = cfg.head_lr if head and cfg.head_lr is not None else cfg.lr
        if depth is not None:
            lr = cfg.lr * cfg.layer_decay ** (depth[1] - depth[0])
        where = f"{'heads' if head else 'encoder'}{'' if depth is None else f' depth {depth[0]}'}"
        param_groups.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
                             "name": f"{where}{'' if decay else ', no decay'}"})
    # fused: one kernel over all tensors (CPU and CUDA); 4.5x faster than the per-tensor loop (bench.py)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=True)


def make_scheduler(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def make_class_weights(cfg: Config, train_features: list[dict]) -> torch.Tensor | None:
    """Inverse class frequencies of the training inputs, when asked (classification tasks only): pooled over the
    criteria (--class_weights, shape (2,)), or each criterion's own two classes (--criterion_weights, shape (9, 2):
    n_c / (2 n_c,k), so a symptom's classes weigh the same within it, however rare its positives)."""
    if not ((cfg.class_weights or cfg.criterion_weights) and TASKS[cfg.task].classify):
        return None
    labels = [np.ravel(f["label"]) for f in train_features]
    if cfg.class_weights:
        flat = np.concatenate(labels)
        counts = np.bincount(flat[flat >= 0], minlength=2).clip(min=1)  # -100: not a pair (--encoding post)
        return torch.tensor(counts.sum() / (2 * counts), dtype=torch.float)
    counts = np.zeros((len(data.SYMPTOMS), 2))
    for f, y in zip(train_features, labels):  # a pair's one label, or a post window's nine (one per criterion)
        criteria = [f["criterion_id"]] if "criterion_id" in f else range(len(data.SYMPTOMS))
        for c, label in zip(criteria, y):
            if label >= 0:
                counts[c, label] += 1
    counts = counts.clip(min=1)
    return torch.tensor(counts.sum(1, keepdims=True) / (2 * counts), dtype=torch.float)


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


def build_training(cfg: Config, accelerator, prepared: PreparedData) -> tuple:
    """(model, optimizer, scheduler, train loader, total optimizer steps), prepared by accelerate."""
    train_features = prepared.features["train"][1]
    model = build_model(cfg, prepared.tokenizer, make_class_weights(cfg, train_features))
    dl_kwargs, pad = dataloader_kwargs(cfg, accelerator.device.type == "cuda"), prepared.tokenizer.pad_token_id
    processes = accelerator.num_processes
    batch = per_process_batch(len(train_features), cfg.batch_size, processes)
    if batch < cfg.batch_size and processes > 1 and accelerator.is_main_process:
        log.warning("--batch_size %d: more than the %d training inputs shared by %d processes: each takes %d a step "
                    "(accelerate would fill every batch up to %d with copies)", cfg.batch_size, len(train_features),
                    processes, batch, cfg.batch_size)
    train_loader = make_loader(train_features, cfg.batch_size, True, pad, cfg.seed, processes=processes, **dl_kwargs)
    model, optimizer, train_loader = accelerator.prepare(model, make_optimizer(model, cfg), train_loader)
    _, total_steps = step_budget(cfg, len(train_loader))
    return model, optimizer, make_scheduler(cfg, optimizer, total_steps), train_loader, total_steps


def _nothing(*args, **kwargs) -> None:
    return None


@dataclass
class Hooks:
    """What the caller does beside the loop, each optional: runner.py logs to MLflow and the console and saves
    checkpoints/last there; hpo.py prunes at validation."""
    logged: Callable = _nothing  # (step, train loss, lr) after every optimizer step
    validated: Callable = _nothing  # (epoch, val metrics, step, total steps) after every validation
    save_state: Callable = _nothing  # (state, scheduler) every --save_every steps, after every epoch, at a SIGTERM
    best_info: dict = field(default_factory=dict)  # more for the best checkpoint's checkpoint.json
    card: Callable | None = None  # (cfg, metrics, n_params, splits) -> the best checkpoint's README.md


# --------------------------------------------------------------------------- the step and the loop

def train_step(model, batch, optimizer, scheduler, accelerator, cfg: Config) -> tuple[torch.Tensor | None, float]:
    """One micro-batch: forward (the model returns its loss), backward, clip, step. Returns (the detached loss, or
    None when --skip_nonfinite skipped it; the rate the optimizer step used).

    Under gradient accumulation accelerate's wrapped optimizer and scheduler skip step() and zero_grad() on every
    micro-batch but the last of an accumulation (accelerator.sync_gradients); the gradients add up meanwhile."""
    with accelerator.accumulate(model):
        loss = model(**batch)["loss"]
        # every process must agree, or DDP would wait for the skipped backward: a sync per step, only when asked
        skip = cfg.skip_nonfinite and accelerator.gather(~torch.isfinite(loss.detach()).reshape(1)).any()
        if not skip:
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    return (None if skip else loss.detach()), lr


def real_inputs(batch, accelerator) -> int:
    """The inputs of this micro-batch over all processes, without the copies accelerate adds to the epoch's last
    batch so that every process gets a full one (its remainder: the real ones of that batch; make_loader puts the one
    short batch last)."""
    state = accelerator.gradient_state
    if accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
        return state.remainder
    return len(batch["input_ids"]) * accelerator.num_processes


def step_loss(micro_losses: list[torch.Tensor], step: int) -> float:
    """The loss of one optimizer step (the mean of its micro-batches), on the host: one sync per step. A
    non-finite loss stops the run at that step, naming it."""
    loss = torch.stack(micro_losses).mean().float().item()
    if not math.isfinite(loss):
        raise UserError(f"loss became {loss} at step {step}: lower --lr, keep --max_grad_norm on, or check the data")
    return loss


class OutOfMemory(Exception):
    """A training step ran out of device memory (runner.py retries the run at half the batch)."""

    def __init__(self, step: int, batch_size: int, error: BaseException):
        super().__init__(f"out of memory at step {step} with --batch_size {batch_size} ({first_line(error)[:120]})")
        self.step, self.batch_size = step, batch_size


def stop_requested(accelerator) -> bool:
    """Whether a SIGTERM asked the run to stop (utils.STEP_BOUNDARY). Every process must stop at the same step, or the
    others would wait in the next step's all-reduce: under several processes, a flag gathered each step."""
    asked = STEP_BOUNDARY.asked
    if accelerator.num_processes > 1:
        asked = bool(accelerator.gather(torch.tensor([asked], device=accelerator.device)).any())
    return asked


def stop_on_sigterm(step: int) -> None:
    log.info("SIGTERM: stopping at step %d, checkpoints/last saved there (--resume continues from it)", step)
    raise Terminated()


def train(cfg: Config, accelerator, prepared: PreparedData, out_dir: Path, resume_from: Path | None = None,
          hooks: Hooks | None = None) -> tuple[dict, dict, LoopState]:
    """Train, validate each epoch (or every --eval_every steps), keep the best checkpoint (out_dir/checkpoints/best),
    test it. Returns (metrics {"val", "test", ["test_shift",] "train"}, predictions per split, the loop state).
    `resume_from`: a checkpoints/last to continue from. A SIGTERM stops it at the next step boundary, with
    checkpoints/last saved there; a step out of memory raises OutOfMemory."""
    from tqdm.auto import tqdm

    hooks, metric_name, t_start = hooks or Hooks(), main_metric(cfg), time.perf_counter()
    best_dir = out_dir / "checkpoints" / "best"
    model, optimizer, scheduler, train_loader, total_steps = build_training(cfg, accelerator, prepared)
    scoring = Scoring(cfg.eval_batch_size)
    state = resume_state(accelerator, scheduler, resume_from, cfg) if resume_from else LoopState()
    batch_size = per_process_batch(len(prepared.features["train"][1]), cfg.batch_size, accelerator.num_processes)
    if state.batch_size and state.batch_size != batch_size:  # saved before an out-of-memory fallback halved it
        state.batches_done = state.batches_done * state.batch_size // batch_size  # as many inputs, not the same ones
    state.batch_size = batch_size
    # no bar (its \r frames) where stderr is a file: runner.py's log line instead
    progress = tqdm(total=total_steps, initial=state.global_step, desc=f"train {cfg.task}", mininterval=2,
                    disable=not (accelerator.is_main_process and sys.stderr.isatty()))
    micro_losses, samples, first_step_s = [], 0, None
    t_train, stop = time.perf_counter(), state.global_step >= total_steps
    model.train()
    with STEP_BOUNDARY:  # a SIGTERM is taken after a step (stop_requested), with checkpoints/last saved there
        while not stop and state.epoch < cfg.epochs:
            epoch = state.epoch
            train_loader.set_epoch(epoch)  # accelerate's loader passes it on to our sampler at each new iterator
            batches = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done \
                else train_loader
            for batch in batches:
                try:
                    loss, lr = train_step(model, batch, optimizer, scheduler, accelerator, cfg)
                except RuntimeError as e:  # torch.OutOfMemoryError is one
                    if not out_of_memory(e):
                        raise
                    raise OutOfMemory(state.global_step + 1, batch_size, e) from None
                if loss is None:
                    log.warning("non-finite loss: step skipped (--skip_nonfinite)")
                    state.skipped_steps += 1
                else:
                    micro_losses.append(loss)
                state.batches_done += 1
                samples += real_inputs(batch, accelerator)
                if not accelerator.sync_gradients:  # inside a gradient accumulation
                    continue
                state.global_step += 1
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_start
                    log.info("first optimizer step %.1f s after start", first_step_s)
                if micro_losses:
                    state.curve.append([state.global_step, step_loss(micro_losses, state.global_step), lr])
                    hooks.logged(*state.curve[-1])
                    if state.global_step % cfg.log_every == 0:
                        progress.set_postfix(loss=f"{state.curve[-1][1]:.4f}", lr=f"{lr:.2e}")
                micro_losses = []
                progress.update(1)
                budget_spent = state.global_step >= total_steps
                epoch_done = state.batches_done == len(train_loader)
                if budget_spent or (cfg.eval_every and state.global_step % cfg.eval_every == 0) or \
                        (epoch_done and not cfg.eval_every):
                    # validation; the thresholds tuned on it (null answer, evidence sentences, per symptom) go with the
                    # best checkpoint
                    metrics, _, thresholds = score_split(model, "val", prepared, cfg, accelerator, scoring)
                    value = metrics[metric_name]
                    state.history.append({"epoch": epoch, "step": state.global_step, metric_name: value})
                    log.info("epoch %d step %d: val %s %.4f", epoch, state.global_step, metric_name, value)
                    hooks.validated(epoch, metrics, state.global_step, total_steps)
                    if improves(state.best, value, cfg):
                        state.best, state.bad_epochs, state.thresholds = value, 0, thresholds
                        info = {"thresholds": thresholds, "epoch": epoch, "step": state.global_step,
                                metric_name: value, "val_metrics": metrics, **hooks.best_info}
                        save_best(accelerator, model, prepared.tokenizer, cfg, best_dir, info, prepared.splits,
                                  hooks.card)
                    else:
                        state.bad_epochs += 1
                    accelerator.wait_for_everyone()
                    model.train()  # evaluate() left it in eval mode
                    stop = budget_spent or (cfg.patience > 0 and state.bad_epochs >= cfg.patience)
                    if stop and not budget_spent:
                        log.info("early stopping at epoch %d step %d: val %s has not improved by more than %g for %d "
                                 "validations (best %.4f)", epoch, state.global_step, metric_name, cfg.min_delta,
                                 state.bad_epochs, state.best)
                if stop:
                    break
                terminated = not epoch_done and stop_requested(accelerator)  # at an epoch's end: after its save below
                if terminated or (cfg.save_every and state.global_step % cfg.save_every == 0 and not epoch_done):
                    hooks.save_state(state, scheduler)
                if terminated:
                    stop_on_sigterm(state.global_step)
            if state.batches_done == len(train_loader):  # the epoch ran to its end
                state.epoch, state.batches_done = epoch + 1, 0
            hooks.save_state(state, scheduler)  # after every epoch, and at the end
            if stop_requested(accelerator):
                stop_on_sigterm(state.global_step)
    progress.close()
    train_s = time.perf_counter() - t_train

    load_best(accelerator, model, best_dir)
    results, predictions = test_best(model, prepared, cfg, accelerator, state.thresholds, scoring)
    results["train"] = {"steps": state.global_step, "epochs_completed": state.epoch, "train_seconds": train_s,
                        "samples_per_second": samples / max(train_s, 1e-9),
                        "seconds_to_first_step": first_step_s, "processes": accelerator.num_processes,
                        "skipped_nonfinite_steps": state.skipped_steps,
                        "eval_batch_fallbacks": scoring.fallbacks}
    return results, predictions, state


def main(argv=None):
    from files import find_complete_dir
    from runner import run  # the run around the loop: output folder, resume, MLflow, outputs

    cfg, args = parse_config(argv, prog="train.py", doc=__doc__)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    log.info("config (non-default fields): %s", changed_fields(cfg))
    if "lr" not in changed_fields(cfg):
        log.info("lr %g (auto): %s", cfg.lr, auto_lr(cfg)[1])
    try:
        run(cfg, accelerator, config_file=args.config)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the one line run_main prints says whether it can resume
        out = getattr(e, "run_dir", None)
        if out is not None and find_complete_dir(out / "checkpoints" / "last") is not None:
            e.note = f"continue it with: python train.py --output_dir {out} --resume true (and the same flags)"
        elif out is not None:
            e.note = f"no training state was saved yet in {out}: nothing to resume, start it again"
        raise


if __name__ == "__main__":
    run_main(main)
