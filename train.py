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

Reading order: `train` at the bottom is the whole run, top to bottom: setup, the epoch loop, test and
outputs. Everything above it is one named step of it, with explicit arguments.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
from evaluate import dumps, evaluate, format_metrics, write_jsonl
from models import (
    TASKS,
    build_model,
    build_tokenizer,
    compute_loss,
    featurize,
    load_checkpoint,
    model_card,
    save_checkpoint,
)
from utils import (
    Config,
    Tracker,
    UserError,
    dataloader_kwargs,
    find_complete_dir,
    load_yaml_config,
    make_accelerator,
    output_dir_lock,
    parse_config,
    replace_dir,
    run_main,
    save_config,
    set_seed,
    setup_logging,
    system_info,
    write_text_atomic,
)

log = logging.getLogger("redsm5")

# --------------------------------------------------------------------------- data, tokenised once per setting

# Every Config field that the splits, the tokenizer or the features depend on; the cache key is built
# from these names, so a field added here can never be forgotten in the key.
DataKey = namedtuple("DataKey", ["task", "data_dir", "demo_posts", "demo_seed", "unit", "include_negatives",
                                 "include_special_case", "fuzzy_threshold", "val_ratio", "test_ratio", "splits_file",
                                 "seed", "model", "trust_remote_code", "tiny_vocab", "max_length", "doc_stride",
                                 "encoding", "demo_shift_posts", "test_shift_dir"])
# features: {split: (examples, features)} for train, val, test and, when there is one, test_shift
PreparedData = namedtuple("PreparedData", ["splits", "tokenizer", "features", "report"])
_DATA_CACHE: dict[DataKey, PreparedData] = {}  # reused by every HPO trial in this process


def data_key(cfg: Config) -> DataKey:
    return DataKey(*(getattr(cfg, name) for name in DataKey._fields))


def prepare_data(cfg: Config, output_dir: Path | None = None) -> PreparedData:
    """Load, split and tokenise; cached per DataKey. A resumed run reads its saved tokenizer back."""
    key = data_key(cfg)
    saved_tokenizer = output_dir / "tokenizer" if output_dir else None
    resuming = bool(cfg.resume and saved_tokenizer and saved_tokenizer.exists())
    if key in _DATA_CACHE and not resuming:
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
    if resuming:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(saved_tokenizer))
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
    """AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors (CPU and CUDA); 4.5x faster than the per-tensor loop (bench.py)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


def make_scheduler(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def make_class_weights(cfg: Config, train_feats: list[dict], device) -> torch.Tensor | None:
    """Inverse class frequencies of the training inputs, when asked (classification tasks only)."""
    if not (cfg.class_weights and TASKS[cfg.task].classify):
        return None
    labels = np.concatenate([np.ravel(f["label"]) for f in train_feats])
    counts = np.bincount(labels[labels >= 0], minlength=2).clip(min=1)  # -100: not a pair (--encoding post)
    return torch.tensor(counts.sum() / (2 * counts), dtype=torch.float, device=device)


def train_step(model, batch, optimizer, accelerator, cfg: Config, class_weights=None) -> torch.Tensor | None:
    """One micro-batch: forward, backward, and the optimizer step at accumulation boundaries.
    The detached loss, or None when a non-finite loss was skipped (--skip_nonfinite)."""
    with accelerator.accumulate(model):
        loss = compute_loss(model(**batch), batch, cfg, class_weights)
        # every process must agree, or DDP would wait for the skipped backward: a sync per step, only when asked
        if cfg.skip_nonfinite and accelerator.gather(~torch.isfinite(loss.detach()).reshape(1)).any():
            log.warning("loss %s: step skipped", loss.item())
            loss = None
        else:
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return None if loss is None else loss.detach()


# --------------------------------------------------------------------------- loop state and logging

@dataclass
class LoopState:
    """Where training stands; saved with checkpoints/last as trainer_state.json, so a resume continues exactly."""
    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already trained on
    global_step: int = 0  # optimizer steps
    best: float | None = None  # best validation value of the main metric
    bad_epochs: int = 0  # validations without improvement, for --patience
    thresholds: dict = field(default_factory=dict)  # tuned on validation for the best checkpoint (evaluate)
    run_id: str | None = None  # the MLflow run a resume continues
    history: list = field(default_factory=list)  # validation metric per epoch
    curve: list = field(default_factory=list)  # [step, train loss, lr] per optimizer step, for history.json
    skipped_steps: int = 0  # non-finite losses skipped


@dataclass
class StepLog:
    """Losses on their way to the log, and this process's counters; not part of the saved state."""
    t_start: float
    micro_losses: list = field(default_factory=list)  # of the optimizer step under way
    pending: list = field(default_factory=list)  # (step, loss tensor, lr): one host sync per log_every steps
    samples: int = 0
    first_step_s: float | None = None


def flush_losses(steplog: StepLog, state: LoopState, tracker: Tracker, progress) -> None:
    """Move the pending losses to the host in one sync; a non-finite one stops the run naming its step."""
    losses = torch.stack([loss for _, loss, _ in steplog.pending]).float().cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        raise UserError(f"loss became {losses[bad[0]]} at step {steplog.pending[bad[0]][0]}: lower --lr, "
                        "keep --max_grad_norm on, or check the data")
    for (step, _, lr), loss in zip(steplog.pending, losses):
        tracker.log_metrics({"train_loss": float(loss), "lr": lr}, step=step)
        state.curve.append([step, float(loss), lr])
    progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{steplog.pending[-1][2]:.2e}")
    steplog.pending = []


# --------------------------------------------------------------------------- checkpoints

def save_last(accelerator, path: Path, state: LoopState, scheduler, keep: int = 1) -> None:
    """Full training state for --resume, swapped in whole by replace_dir.

    accelerate writes weights as safetensors and optimizer/RNG states as tensors that it reads back
    with torch.load(weights_only=True); the scheduler and loop state go to JSON. Nothing is unpickled.
    """
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**asdict(state), "scheduler": scheduler.state_dict()},
                                                           indent=2))
        replace_dir(tmp, path)
        if keep > 1:  # older states stay as step-N copies, for rolling back by hand
            shutil.copytree(path, path.with_name(f"step-{state.global_step:07d}"), dirs_exist_ok=True)
            for stale in sorted(path.parent.glob("step-*"))[: -(keep - 1)]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()


def load_last(path: Path) -> Path:
    """The complete training state to resume from: checkpoints/last, or its .old copy after a crash mid-save."""
    found = find_complete_dir(path)
    if found is None:
        raise UserError(f"{path}: no complete training state to resume from (missing or torn save)")
    return found


def resume_state(accelerator, scheduler, resume_from: Path, cfg: Config) -> LoopState:
    try:
        accelerator.load_state(str(resume_from))
    except RuntimeError as e:  # weights of another task or model size
        raise UserError(f"{resume_from}: cannot resume with --task {cfg.task} --model {cfg.model}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    saved = json.loads((resume_from / "trainer_state.json").read_text())
    scheduler.load_state_dict(saved.pop("scheduler"))
    state = LoopState(**{f.name: saved[f.name] for f in dataclasses.fields(LoopState) if f.name in saved})
    log.info("resumed from %s at epoch %d, batch %d, step %d", resume_from, state.epoch, state.batches_done,
             state.global_step)
    return state


def save_best(accelerator, model, tokenizer, cfg: Config, best_dir: Path, info: dict, splits: dict) -> None:
    """The best model so far as an evaluate.py checkpoint (Hugging Face layout, models.save_checkpoint) with a
    model card of its validation metrics, swapped in whole by replace_dir."""
    weights = accelerator.get_state_dict(model)  # a collective under FSDP: every process gathers
    if accelerator.is_main_process:
        tmp = best_dir.with_name(best_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = {**info, "encoder_parameters": sum(v.numel() for k, v in weights.items() if k.startswith("encoder."))}
        card = model_card(cfg, {"val": info["val_metrics"]}, info["encoder_parameters"], splits)
        save_checkpoint(accelerator.unwrap_model(model), tokenizer, cfg, tmp, info, state_dict=weights, card=card)
        (tmp / "splits.json").write_text(json.dumps(splits))
        replace_dir(tmp, best_dir)


def load_best(accelerator, model, best_dir: Path) -> None:
    """Read the best weights back from the checkpoint, exactly as evaluate.py will (models.load_checkpoint)."""
    accelerator.wait_for_everyone()
    best_weights = load_checkpoint(find_complete_dir(best_dir))[0].state_dict()
    if getattr(accelerator, "is_fsdp2", False):  # sharded: each process takes its shard of the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, best_weights, options=StateDictOptions(full_state_dict=True))
    else:
        accelerator.unwrap_model(model).load_state_dict(best_weights)


# --------------------------------------------------------------------------- one epoch, one validation

def train_epoch(model, train_loader, optimizer, scheduler, accelerator, cfg: Config, class_weights, total_steps: int,
                state: LoopState, steplog: StepLog, tracker: Tracker, progress, last_dir: Path) -> None:
    """Train from state.batches_done to the end of the epoch, or until the step budget is spent."""
    train_loader.set_epoch(state.epoch)  # accelerate's loader passes it on to our sampler at each new iterator
    loader = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
    for batch in loader:
        loss = train_step(model, batch, optimizer, accelerator, cfg, class_weights)
        state.batches_done += 1
        steplog.samples += len(batch["input_ids"])
        if loss is None:
            state.skipped_steps += 1
        else:
            steplog.micro_losses.append(loss)
        if not accelerator.sync_gradients:
            continue
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        state.global_step += 1
        step = state.global_step
        if steplog.first_step_s is None:
            steplog.first_step_s = time.perf_counter() - steplog.t_start
            log.info("first optimizer step %.1f s after start", steplog.first_step_s)
        if steplog.micro_losses:
            steplog.pending.append((step, torch.stack(steplog.micro_losses).mean(), lr))
        steplog.micro_losses = []
        if steplog.pending and (step % cfg.log_every == 0 or step == total_steps):
            flush_losses(steplog, state, tracker, progress)
        progress.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            tracker.flush()  # the MLflow history of a resumed run then has no hole
            save_last(accelerator, last_dir, state, scheduler, cfg.keep_checkpoints)
        if step >= total_steps:
            return


def validate(model, loader, split_data: tuple, cfg: Config, accelerator, metric_name: str) -> tuple[dict, dict]:
    """(validation metrics, thresholds tuned on them); only computes. The metric to watch must be among them."""
    examples, feats = split_data
    metrics, _, thresholds = evaluate(model, loader, feats, examples, cfg, accelerator)
    if metric_name not in metrics:
        raise UserError(f"--early_stopping_metric: '{metric_name}' is not a {cfg.task} metric "
                        f"(choose from {', '.join(k for k, v in metrics.items() if isinstance(v, float))})")
    return metrics, thresholds


def improves(best: float | None, value: float, cfg: Config) -> bool:
    sign = 1 if cfg.early_stopping_mode == "max" else -1
    return best is None or sign * (value - best) > cfg.min_delta


def record_validation(state: LoopState, epoch: int, metric_name: str, metrics: dict, tracker: Tracker) -> None:
    value = metrics[metric_name]
    state.history.append({"epoch": epoch, "step": state.global_step, metric_name: value})
    tracker.log_metrics({f"val_{k}": v for k, v in tracked_metrics(metrics).items()}, step=state.global_step,
                        flush=True)
    log.info("epoch %d step %d: val %s %.4f", epoch, state.global_step, metric_name, value)


# --------------------------------------------------------------------------- test and outputs

PREDICTION_FILES = {"val": "val_predictions.jsonl", "test": "predictions.jsonl",
                    "test_shift": "shift_predictions.jsonl"}


def test_best(model, prepared: PreparedData, cfg: Config, accelerator, thresholds: dict, out_dir: Path) -> dict:
    """Metrics of the best checkpoint on val, test and (when there is one) test_shift, all with the thresholds
    tuned on val; predictions written as JSONL."""
    results = {"val": None, "test": None}
    dl_kwargs = dataloader_kwargs(cfg, accelerator.device.type == "cuda")
    for name in [n for n in PREDICTION_FILES if n in prepared.features]:
        examples, feats = prepared.features[name]
        if not examples:
            continue
        loader = accelerator.prepare(data.make_loader(feats, cfg.eval_batch_size, False,
                                                      prepared.tokenizer.pad_token_id, **dl_kwargs))
        metrics, predictions, _ = evaluate(model, loader, feats, examples, cfg, accelerator, thresholds)
        results[name] = metrics
        if accelerator.is_main_process:  # validation predictions too: report.py chooses its decision threshold on them
            write_jsonl(predictions, out_dir / PREDICTION_FILES[name])
    return results


def write_outputs(out_dir: Path, cfg: Config, results: dict, state: LoopState, metric_name: str,
                  tracker: Tracker) -> None:
    """metrics.json, run_stats.json, history.json; the test metrics and files to MLflow. Main process only."""
    # metrics.json holds only what the model scored, so reruns can be compared bit for bit; timings go beside it.
    scored = [n for n in PREDICTION_FILES if n in ("val", "test") or results.get(n)]  # test_shift when there is one
    (out_dir / "metrics.json").write_text(dumps({n: results[n] for n in scored}, indent=2))
    (out_dir / "run_stats.json").write_text(json.dumps({**results["train"], "system": system_info()}, indent=2))
    history = {"metric": metric_name, "val": state.history,  # training curves, also without MLflow
               "steps": [dict(zip(("step", "train_loss", "lr"), row)) for row in state.curve]}
    (out_dir / "history.json").write_text(json.dumps(history))
    for name in scored:
        if results[name]:
            log.info("%s %s (best checkpoint):\n%s", cfg.task, name, format_metrics(results[name]))
            prefix = "best_val_" if name == "val" else name + "_"
            tracker.log_metrics({prefix + k: v for k, v in tracked_metrics(results[name]).items()},
                                step=state.global_step)
    per = {name: (results[name] or {}).get("per_criterion_f1", {}) for name in ("val", "test")}
    if per["test"] or per["val"]:  # one table to read them side by side (Artifacts tab)
        criteria = list(per["test"] or per["val"])
        tracker.log_table({"criterion": criteria, **{f"{n}_f1": [per[n].get(c) for c in criteria] for n in per
                                                     if per[n]}}, "per_criterion_f1.json")
    for f in ("config.yaml", "metrics.json", "run_stats.json", "splits.json"):
        tracker.log_artifact(out_dir / f)


def tracked_metrics(metrics: dict) -> dict:
    """Metrics as MLflow numbers: the F1 per criterion as f1_<CRITERION>, the confusion matrix as cm_tn, cm_fp,
    cm_fn, cm_tp (nested values would otherwise be dropped: MLflow stores one number per key)."""
    out = {k: v for k, v in metrics.items() if k not in ("per_criterion_f1", "confusion_matrix")}
    out.update({f"f1_{c}": v for c, v in metrics.get("per_criterion_f1", {}).items()})
    if "confusion_matrix" in metrics:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        out.update(cm_tn=tn, cm_fp=fp, cm_fn=fn, cm_tp=tp)
    return out


def dataset_input(cfg: Config, report: dict) -> dict:
    """The run's data as an MLflow dataset input (Tracker.log_dataset): a data folder by its path and the sha256
    of its two CSV files, the demo corpus by its parameters and the sha256 of the rows they generate."""
    digest = hashlib.sha256()
    if cfg.data_dir is None:
        posts, annotations = data.make_demo(cfg.demo_posts, cfg.demo_seed)
        digest.update(json.dumps([cfg.demo_posts, cfg.demo_seed, posts, annotations], sort_keys=True).encode())
        name, source_type = f"demo-{cfg.demo_posts}-seed{cfg.demo_seed}", "code"
        source = {"tags": {"mlflow.source.name": f"demo:n_posts={cfg.demo_posts},seed={cfg.demo_seed}"}}
    else:
        folder = Path(cfg.data_dir).resolve()
        for f in data.find_files(folder):  # posts, then annotations
            digest.update(hashlib.sha256(f.read_bytes()).digest())
        name, source_type, source = folder.name, "local", {"uri": str(folder)}
    return {"name": name, "digest": digest.hexdigest()[:16], "source_type": source_type, "source": source,
            "profile": {"posts": report["posts_kept"], "annotations": report["annotations_kept"]},
            "tags": {"sha256": digest.hexdigest()}}  # MLflow keeps at most 36 characters of digest


def log_run_inputs(tracker: Tracker, cfg: Config, prepared: PreparedData) -> None:
    """What a new run starts from, to MLflow: the machine, the data report and the data as a dataset input."""
    if tracker.enabled:
        tracker.log_params({f"system.{k}": v for k, v in system_info().items()})
        tracker.log_dict(prepared.report, "data_report.json")
        tracker.log_dataset(**dataset_input(cfg, prepared.report))


def finish_best(best_dir: Path, cfg: Config, results: dict, splits: dict, tracker: Tracker) -> None:
    """The best checkpoint's model card rewritten with its test metrics; the card, and the whole checkpoint when
    asked (--mlflow_log_model), to the run's artifacts. Main process only."""
    found = find_complete_dir(best_dir)
    if found is None:
        return
    n_params = json.loads((found / "checkpoint.json").read_text()).get("encoder_parameters", 0)
    write_text_atomic(found / "README.md", model_card(cfg, results, n_params, splits))
    tracker.log_artifact(found / "README.md")
    if cfg.mlflow_log_model:
        tracker.log_artifacts(found, "model")


def run_stats(state: LoopState, steplog: StepLog, train_s: float, processes: int, run_id: str | None) -> dict:
    """How the run went (run_stats.json): steps, time, throughput, its MLflow run."""
    return {"steps": state.global_step, "epochs_completed": state.epoch, "train_seconds": train_s,
            "samples_per_second": steplog.samples * processes / max(train_s, 1e-9),
            "seconds_to_first_step": steplog.first_step_s, "processes": processes,
            "skipped_nonfinite_steps": state.skipped_steps, "mlflow_run_id": run_id}


def setup_process(cfg: Config, accelerator):
    """The accelerator (made here unless given), CPU threads and seeds."""
    if accelerator is None:
        accelerator = make_accelerator(cfg)
    else:
        accelerator.gradient_accumulation_steps = cfg.grad_accum
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed, cfg.deterministic, cfg.cudnn_benchmark)
    return accelerator


# Fields a resumed run may change: they decide how long and how verbosely it trains, not what it trains on.
RESUMABLE_FIELDS = {"resume", "epochs", "max_steps", "patience", "save_every", "keep_checkpoints", "log_every",
                    "eval_batch_size", "num_workers", "threads", "deterministic", "cudnn_benchmark", "cudnn_attention",
                    "skip_nonfinite", "mlflow", "tracking_uri", "experiment", "run_name", "mlflow_system_metrics",
                    "mlflow_log_model"}


def check_resume_config(cfg: Config, out_dir: Path) -> None:
    """A resume must continue the same run: a changed seed would redraw the split (test posts trained on),
    a changed data_dir or model would mix two runs. Those are refused; the harmless changes are logged."""
    saved_file = out_dir / "config.yaml"
    if not saved_file.exists():
        return
    saved, now = load_yaml_config(saved_file), asdict(cfg)
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    refused = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in RESUMABLE_FIELDS]
    if refused:
        raise UserError(f"--resume: {saved_file} was trained with other settings ({', '.join(refused[:4])}); "
                        "resume with the saved values, or give another --output_dir")
    if len(changed) > 1:
        log.info("resuming with changed settings: %s", {k: v for k, v in changed.items() if k != "resume"})


def write_run_files(cfg: Config, accelerator, out_dir: Path) -> PreparedData:
    """The resolved config, then the split and tokenizer of the prepared data. (The prepared data.)"""
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
    prepared = prepare_data(cfg, out_dir)
    if accelerator.is_main_process:
        (out_dir / "splits.json").write_text(json.dumps(prepared.splits))
        prepared.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    sizes = [len(x) for name in ("train", "val", "test") for x in prepared.features[name]]
    log.info("task %s: %d train / %d val / %d test examples (%d / %d / %d model inputs)", cfg.task, *sizes[::2],
             *sizes[1::2])
    return prepared


# --------------------------------------------------------------------------- the run

Training = namedtuple("Training", ["model", "optimizer", "scheduler", "train_loader", "val_loader", "total_steps",
                                   "class_weights"])


def build_training(cfg: Config, accelerator, prepared: PreparedData) -> Training:
    """Model, optimizer, loaders (prepared by accelerate), scheduler over the step budget, class weights."""
    train_feats = prepared.features["train"][1]
    model = build_model(cfg, prepared.tokenizer)
    dl_kwargs, pad = dataloader_kwargs(cfg, accelerator.device.type == "cuda"), prepared.tokenizer.pad_token_id
    train_loader = data.make_loader(train_feats, cfg.batch_size, True, pad, cfg.seed, **dl_kwargs)
    val_loader = data.make_loader(prepared.features["val"][1], cfg.eval_batch_size, False, pad, **dl_kwargs)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, make_optimizer(model, cfg), train_loader,
                                                                     val_loader)
    _, total_steps = step_budget(cfg, len(train_loader))
    return Training(model, optimizer, make_scheduler(cfg, optimizer, total_steps), train_loader, val_loader,
                    total_steps, make_class_weights(cfg, train_feats, accelerator.device))


def update_best(state: LoopState, value: float, thresholds: dict, cfg: Config) -> bool:
    """Early-stopping bookkeeping; True when `value` is a new best."""
    if not improves(state.best, value, cfg):
        state.bad_epochs += 1
        return False
    state.best, state.bad_epochs, state.thresholds = value, 0, thresholds
    return True


def train(cfg: Config, accelerator=None, on_validation=None, parent_run_id: str | None = None) -> dict:
    """Train, validate each epoch, keep the best checkpoint, test it. Returns {"val", "test", "train"}.

    `on_validation(epoch, val_metrics)` is called after every validation (HPO prunes there).
    `parent_run_id` nests this run's MLflow run under another (an HPO study, a cross-validation).
    A run that raises is ended in MLflow as KILLED (Ctrl-C) or FAILED, not left RUNNING.
    """
    from tqdm.auto import tqdm

    steplog, out_dir, metric_name = StepLog(t_start=time.perf_counter()), Path(cfg.output_dir), main_metric(cfg)
    best_dir, last_dir = out_dir / "checkpoints" / "best", out_dir / "checkpoints" / "last"
    accelerator = setup_process(cfg, accelerator)
    with contextlib.ExitStack() as run_scope:  # the lock, then the MLflow run: released / ended however we leave
        run_scope.enter_context(output_dir_lock(out_dir, accelerator.is_main_process))
        resume_from = load_last(last_dir) if cfg.resume else None
        if resume_from:
            check_resume_config(cfg, out_dir)
        prepared = write_run_files(cfg, accelerator, out_dir)
        t = build_training(cfg, accelerator, prepared)
        state = resume_state(accelerator, t.scheduler, resume_from, cfg) if resume_from else LoopState()
        tracker = run_scope.enter_context(Tracker(cfg, accelerator.is_main_process, run_id=state.run_id,
                                                  parent_run_id=parent_run_id))
        state.run_id = tracker.run_id
        if not resume_from:
            log_run_inputs(tracker, cfg, prepared)
        progress = tqdm(total=t.total_steps, initial=state.global_step, desc=f"train {cfg.task}", mininterval=2,
                        disable=not accelerator.is_main_process)
        t_train, stop = time.perf_counter(), state.global_step >= t.total_steps
        t.model.train()
        while not stop and state.epoch < cfg.epochs:
            epoch = state.epoch
            train_epoch(t.model, t.train_loader, t.optimizer, t.scheduler, accelerator, cfg, t.class_weights,
                        t.total_steps, state, steplog, tracker, progress, last_dir)
            budget_spent = state.global_step >= t.total_steps
            if not (budget_spent and state.batches_done < len(t.train_loader)):  # the epoch ran to its end
                state.epoch, state.batches_done = epoch + 1, 0
            metrics, thresholds = validate(t.model, t.val_loader, prepared.features["val"], cfg, accelerator,
                                          metric_name)
            record_validation(state, epoch, metric_name, metrics, tracker)
            if on_validation:
                on_validation(epoch, metrics)
            if update_best(state, metrics[metric_name], thresholds, cfg):
                info = {"thresholds": state.thresholds, "epoch": epoch, "step": state.global_step,
                        metric_name: state.best, "val_metrics": metrics}
                save_best(accelerator, t.model, prepared.tokenizer, cfg, best_dir, info, prepared.splits)
            accelerator.wait_for_everyone()
            t.model.train()  # evaluate() left it in eval mode
            stop = budget_spent or (cfg.patience > 0 and state.bad_epochs >= cfg.patience)
            tracker.flush()
            save_last(accelerator, last_dir, state, t.scheduler, cfg.keep_checkpoints)
        progress.close()
        train_s = time.perf_counter() - t_train

        load_best(accelerator, t.model, best_dir)
        results = test_best(t.model, prepared, cfg, accelerator, state.thresholds, out_dir)
        results["train"] = run_stats(state, steplog, train_s, accelerator.num_processes, tracker.run_id)
        if accelerator.is_main_process:
            write_outputs(out_dir, cfg, results, state, metric_name, tracker)
            finish_best(best_dir, cfg, results, prepared.splits, tracker)
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
