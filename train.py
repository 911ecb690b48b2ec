"""Train one task (criteria | evidence | joint) with a hand-written loop wrapped by accelerate.

    python train.py                                        # criteria on the demo corpus, tiny model
    accelerate launch train.py --task evidence             # one process per device the launcher gives
    accelerate launch --multi_gpu --num_processes 2 train.py --task joint   # two gloo processes on CPU
    python train.py --config configs/optimized.yaml --data_dir path/to/redsm5 --model bert-base-uncased
    python train.py --output_dir outputs/run --resume true # continue a killed run from checkpoints/last

A run writes to output_dir: config.yaml, splits.json, metrics.json ({"val", "test"}),
predictions.jsonl (and val_predictions.jsonl), history.json (loss and lr per logged step, validation
metric per epoch), checkpoints/best (what evaluate.py loads), checkpoints/last (for --resume),
and one MLflow run (params, loss and lr per step, validation metrics per epoch, artifacts).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
from evaluate import evaluate, format_metrics, write_jsonl
from models import TASKS, build_model, build_tokenizer, compute_loss, save_checkpoint
from utils import Config, Tracker, UserError, dataloader_kwargs, make_accelerator, parse_config, run_main, save_config, set_seed, \
    setup_logging, system_info

log = logging.getLogger("redsm5")
_DATA_CACHE: dict = {}  # tokenised features, reused by every HPO trial in this process


def prepare_data(cfg: Config, output_dir: Path | None = None):
    """(splits, tokenizer, {split: (examples, features)}): loaded, split and tokenised once per setting."""
    key = (cfg.task, cfg.data_dir, cfg.demo_posts, cfg.demo_seed, cfg.unit, cfg.include_negatives,
           cfg.include_special_case, cfg.fuzzy_threshold, cfg.val_ratio, cfg.test_ratio, cfg.splits_file,
           cfg.seed, cfg.model, cfg.tiny_vocab, cfg.max_length, cfg.doc_stride)
    saved_tokenizer = output_dir / "tokenizer" if output_dir else None
    if key in _DATA_CACHE and not (cfg.resume and saved_tokenizer and saved_tokenizer.exists()):
        return _DATA_CACHE[key]
    corpus = data.load_corpus(cfg.data_dir, demo_posts=cfg.demo_posts, demo_seed=cfg.demo_seed,
                              include_special_case=cfg.include_special_case, fuzzy_threshold=cfg.fuzzy_threshold)
    log.info("\n%s", data.format_report(corpus.report))
    if cfg.splits_file:
        splits = data.load_splits(cfg.splits_file, corpus)
    else:
        splits = data.split_posts(corpus, cfg.seed, cfg.val_ratio, cfg.test_ratio)
    task = TASKS[cfg.task]
    examples = {name: task.examples(corpus, ids, cfg) for name, ids in splits.items()}
    if task.spans:
        log.info("evidence spans usable after alignment (all splits): %s", data.span_usability(corpus, list(corpus.posts)))
    for name in ("train", "val"):
        if not examples[name]:
            raise UserError(f"the {name} split has no examples for task '{cfg.task}' (too little data?)")
    if cfg.resume and saved_tokenizer and saved_tokenizer.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(saved_tokenizer))
    else:
        train_texts = {corpus.posts[p] for p in splits["train"]} | {e["text"] for e in examples["train"]}
        tokenizer = build_tokenizer(cfg, sorted(train_texts))
    windows = task.windows(cfg)
    features = {name: (ex, data.featurize(tokenizer, ex, cfg.max_length, cfg.doc_stride, windows))
                for name, ex in examples.items()}
    _DATA_CACHE.clear()  # one setting at a time: features of big corpora are large
    _DATA_CACHE[key] = (splits, tokenizer, features, corpus.report)
    return _DATA_CACHE[key]


def make_optimizer(model, cfg: Config):
    """AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors (CPU and CUDA); 4.5x faster than the per-tensor loop (bench.py)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


def save_last(accelerator, path: Path, state: dict, scheduler, keep: int = 1) -> None:
    """Full training state for --resume, written atomically: a temp folder renamed over the old one.

    accelerate writes weights as safetensors and optimizer/RNG states as tensors that it reads back
    with torch.load(weights_only=True); the scheduler and loop state go to JSON. Nothing is unpickled.
    """
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}, indent=2))
        (tmp / "COMPLETE").touch()  # written last: a folder without it is a torn save
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        if keep > 1:  # older states stay as step-N copies, for rolling back by hand
            shutil.copytree(path, path.with_name(f"step-{state['global_step']:07d}"), dirs_exist_ok=True)
            for stale in sorted(path.parent.glob("step-*"))[: -(keep - 1)]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()


def load_last(path: Path) -> Path:
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of save_last
    if not (path / "COMPLETE").exists():
        raise UserError(f"{path}: no complete training state to resume from (missing or torn save)")
    return path


def train(cfg: Config, accelerator=None, report=None) -> dict:
    """Train, validate each epoch, keep the best checkpoint, test it. Returns {"val": .., "test": ..}.

    `report(epoch, val_metrics)` is called after every validation (HPO uses it to prune). A run that
    raises is ended in MLflow as KILLED (Ctrl-C) or FAILED, not left RUNNING.
    """
    opened = []  # the run's Tracker, once there is one
    try:
        return _train(cfg, accelerator, report, opened)
    except BaseException as e:
        for tracker in opened:
            tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _train(cfg: Config, accelerator, report, opened: list) -> dict:
    t_start = time.perf_counter()
    if accelerator is None:
        accelerator = make_accelerator(cfg)
    else:
        accelerator.gradient_accumulation_steps = cfg.grad_accum
    is_main = accelerator.is_main_process
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed, cfg.deterministic, cfg.cudnn_benchmark)
    out_dir = Path(cfg.output_dir)
    best_dir, last_dir = out_dir / "checkpoints" / "best", out_dir / "checkpoints" / "last"
    resume_from = load_last(last_dir) if cfg.resume else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    task = TASKS[cfg.task]
    splits, tokenizer, features, data_report = prepare_data(cfg, out_dir)
    if is_main:
        (out_dir / "splits.json").write_text(json.dumps(splits))
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    (train_ex, train_feats), (val_ex, val_feats) = features["train"], features["val"]
    log.info("task %s: %d train / %d val / %d test examples (%d / %d / %d model inputs)", cfg.task, len(train_ex),
             len(val_ex), len(features["test"][0]), len(train_feats), len(val_feats), len(features["test"][1]))

    model = build_model(cfg, tokenizer)
    dl_kwargs = dataloader_kwargs(cfg, accelerator.device.type == "cuda")
    pad = tokenizer.pad_token_id
    train_loader = data.make_loader(train_feats, cfg.batch_size, True, pad, cfg.seed, **dl_kwargs)
    val_loader = data.make_loader(val_feats, cfg.eval_batch_size, False, pad, **dl_kwargs)
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # Sized from the prepared (per-process) loader, stepped once per optimizer step: right under
    # gradient accumulation and any number of processes.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps <= 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    class_weights = None
    if cfg.class_weights and task.classify:
        counts = np.bincount([f["label"] for f in train_feats], minlength=2).clip(min=1)
        class_weights = torch.tensor(counts.sum() / (2 * counts), dtype=torch.float, device=accelerator.device)

    metric_name = task.main_metric if cfg.early_stopping_metric == "auto" else cfg.early_stopping_metric
    sign = 1 if cfg.early_stopping_mode == "max" else -1
    state = {"epoch": 0, "batches_done": 0, "global_step": 0, "best": None, "bad_epochs": 0,
             "null_threshold": None, "run_id": None, "history": [], "curve": [], "skipped_steps": 0}
    if resume_from:
        try:
            accelerator.load_state(str(resume_from))
        except RuntimeError as e:  # weights of another task or model size
            raise UserError(f"{resume_from}: cannot resume with --task {cfg.task} --model {cfg.model}: "
                            f"{' '.join(str(e).split())[:300]}") from None
        state = {"curve": [], **json.loads((resume_from / "trainer_state.json").read_text())}
        scheduler.load_state_dict(state.pop("scheduler"))
        log.info("resumed from %s at epoch %d, batch %d, step %d", resume_from, state["epoch"],
                 state["batches_done"], state["global_step"])
    tracker = Tracker(cfg, is_main, run_id=state["run_id"], parent_run_id=getattr(cfg, "_parent_run_id", None))
    state["run_id"] = tracker.run_id
    opened.append(tracker)
    if is_main and not resume_from:
        tracker.log_params({f"system.{k}": v for k, v in system_info().items()})
        tracker.log_dict(data_report, "data_report.json")

    def validate(epoch: int) -> bool:
        """Validate, keep the best checkpoint, update early stopping; True = stop training."""
        metrics, _, threshold = evaluate(model, val_loader, val_feats, val_ex, cfg, accelerator)
        if metric_name not in metrics:
            raise UserError(f"--early_stopping_metric: '{metric_name}' is not a {cfg.task} metric "
                            f"(choose from {', '.join(k for k, v in metrics.items() if isinstance(v, float))})")
        value = metrics[metric_name]
        state["history"].append({"epoch": epoch, "step": state["global_step"], metric_name: value})
        tracker.log_metrics({f"val_{k}": v for k, v in metrics.items() if k != "per_criterion_f1"},
                            step=state["global_step"], flush=True)
        log.info("epoch %d step %d: val %s %.4f", epoch, state["global_step"], metric_name, value)
        if report:
            report(epoch, metrics)
        if state["best"] is None or sign * (value - state["best"]) > cfg.min_delta:
            finite = threshold is not None and math.isfinite(threshold)  # JSON has no infinity
            state.update(best=value, bad_epochs=0, null_threshold=threshold if finite else None)
            weights = accelerator.get_state_dict(model)  # a collective under FSDP: every process gathers
            if is_main:
                tmp = best_dir.with_name("best.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                save_checkpoint(accelerator.unwrap_model(model), tokenizer, cfg, tmp,
                                {"null_threshold": state["null_threshold"], "epoch": epoch, "step": state["global_step"],
                                 metric_name: value, "val_metrics": metrics}, state_dict=weights)
                (tmp / "splits.json").write_text(json.dumps(splits))
                old = best_dir.with_name("best.old")
                if best_dir.exists():
                    best_dir.rename(old)
                tmp.rename(best_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            state["bad_epochs"] += 1
        accelerator.wait_for_everyone()
        model.train()  # evaluate() left it in eval mode
        return cfg.patience > 0 and state["bad_epochs"] >= cfg.patience

    progress = None
    if is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state["global_step"], desc=f"train {cfg.task}", mininterval=2)
    first_step_s, t_train, samples = None, time.perf_counter(), 0
    micro_losses, pending, stop = [], [], state["global_step"] >= total_steps
    model.train()
    while not stop and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch)  # accelerate's loader passes it on to our sampler at each new iterator
        loader = accelerator.skip_first_batches(train_loader, state["batches_done"]) if state["batches_done"] else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss = compute_loss(model(**batch), batch, cfg, class_weights)
                # every process must agree, or DDP would wait for the skipped backward: a sync per step, only when asked
                if cfg.skip_nonfinite and accelerator.gather(~torch.isfinite(loss.detach()).reshape(1)).any():
                    log.warning("loss %s at step %d: step skipped", loss.item(), state["global_step"] + 1)
                    state["skipped_steps"] += 1
                    loss = None
                else:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["batches_done"] += 1
            samples += len(batch["input_ids"])
            if loss is not None:
                micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state["global_step"] += 1
            if first_step_s is None:
                first_step_s = time.perf_counter() - t_start
                log.info("first optimizer step %.1f s after start", first_step_s)
            step = state["global_step"]
            if micro_losses:
                pending.append((step, torch.stack(micro_losses).mean(), lr))
            micro_losses = []
            if pending and (step % cfg.log_every == 0 or step == total_steps):
                losses = torch.stack([l for _, l, _ in pending]).float().cpu().numpy()  # one host sync per log_every steps
                bad = np.flatnonzero(~np.isfinite(losses))
                if len(bad):
                    raise UserError(f"loss became {losses[bad[0]]} at step {pending[bad[0]][0]}: lower --lr, "
                                    "keep --max_grad_norm on, or check the data")
                for (s, _, step_lr), step_loss in zip(pending, losses):
                    tracker.log_metrics({"train_loss": float(step_loss), "lr": step_lr}, step=s)
                    state["curve"].append([s, float(step_loss), step_lr])  # for history.json
                pending = []
                progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}") if progress else None
            progress.update(1) if progress else None
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                tracker.flush()  # the MLflow history of a resumed run then has no hole
                save_last(accelerator, last_dir, state, scheduler, cfg.keep_checkpoints)
            if step >= total_steps:
                stop = True
                break
        if stop and state["batches_done"] < len(train_loader):  # max_steps inside an epoch: validate there
            stop = validate(epoch) or True
        else:
            state["epoch"], state["batches_done"] = epoch + 1, 0
            stop = validate(epoch) or stop
        tracker.flush()
        save_last(accelerator, last_dir, state, scheduler, cfg.keep_checkpoints)
    train_s = time.perf_counter() - t_train
    if progress:
        progress.close()

    # Test the best checkpoint exactly as evaluate.py will: weights read back from safetensors.
    from safetensors.torch import load_file

    accelerator.wait_for_everyone()
    best_weights = load_file(str(best_dir / "model.safetensors"))
    if getattr(accelerator, "is_fsdp2", False):  # sharded: each process takes its shard of the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, best_weights, options=StateDictOptions(full_state_dict=True))
    else:
        accelerator.unwrap_model(model).load_state_dict(best_weights)
    results = {"val": None, "test": None}
    for name in ("val", "test"):
        ex, feats = features[name]
        if not ex:
            continue
        loader = accelerator.prepare(data.make_loader(feats, cfg.eval_batch_size, False, pad, **dl_kwargs))
        threshold = state["null_threshold"]
        metrics, predictions, _ = evaluate(model, loader, feats, ex, cfg, accelerator,
                                           float("inf") if threshold is None else threshold)
        results[name] = metrics
        if is_main:  # validation predictions too: report.py chooses its decision threshold on them
            write_jsonl(predictions, out_dir / ("predictions.jsonl" if name == "test" else "val_predictions.jsonl"))
    results["train"] = {"steps": state["global_step"], "epochs_completed": state["epoch"], "train_seconds": train_s,
                        "samples_per_second": samples * accelerator.num_processes / max(train_s, 1e-9),
                        "seconds_to_first_step": first_step_s, "processes": accelerator.num_processes,
                        "skipped_nonfinite_steps": state["skipped_steps"]}
    if is_main:
        # metrics.json holds only what the model scored, so reruns can be compared bit for bit;
        # timings go beside it.
        (out_dir / "metrics.json").write_text(json.dumps({"val": results["val"], "test": results["test"]}, indent=2))
        (out_dir / "run_stats.json").write_text(json.dumps({**results["train"], "system": system_info()}, indent=2))
        history = {"metric": metric_name, "val": state["history"],  # training curves, also without MLflow
                   "steps": [dict(zip(("step", "train_loss", "lr"), row)) for row in state["curve"]]}
        (out_dir / "history.json").write_text(json.dumps(history))
        for name in ("val", "test"):
            if results[name]:
                log.info("%s %s (best checkpoint):\n%s", cfg.task, name, format_metrics(results[name]))
                prefix = "test_" if name == "test" else "best_val_"
                tracker.log_metrics({prefix + k: v for k, v in results[name].items() if k != "per_criterion_f1"},
                                    step=state["global_step"])
        for f in ("config.yaml", "metrics.json", "run_stats.json", "splits.json"):
            tracker.log_artifact(out_dir / f)
        tracker.end()
    return results


def main(argv=None):
    cfg, _ = parse_config(argv, prog="train.py")
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    changed = {k: v for k, v in asdict(cfg).items() if v != getattr(Config, k)}
    log.info("config (non-default fields): %s", changed)
    train(cfg, accelerator)


if __name__ == "__main__":
    run_main(main)
