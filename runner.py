"""One run: train.py's training loop inside what a run needs around it. `run` is what `python train.py`,
hpo.py (a trial) and report.py (a fold x seed) call.

Around `train.train` it takes the output folder's lock, checks the folder (rundir.py), records a new run or checks
a resumed one, opens the MLflow run (tracking.py) and gives the loop its hooks: the loss and rate of every step to
MLflow (and, where stderr is a file, a console line every 30 s), validation metrics, checkpoints/last every
--save_every steps, every epoch and at a SIGTERM. A step out of memory retries at half the batch.
When the loop is done it writes what a finished run leaves in output_dir:

    config.yaml, splits.json, tokenizer/, run.json   the run's record (written at its start; --resume checks it)
    metrics.json          {"val", "test"} and "test_shift" when there is a shifted test set (the demo's held-out
                          phrasing, or --test_shift_dir): only what the model scored, comparable byte for byte
    predictions.jsonl     (and val_predictions.jsonl, shift_predictions.jsonl)
    error_page.html       the test posts, the worst errors first: gold vs predicted symptoms and evidence (errorpage.py)
    history.json          loss and lr per step, the validation metric per epoch
    run_stats.json        timings, what ran (device, precision, processes), the MLflow run id
    checkpoints/best      what evaluate.py loads: encoder/ (Hugging Face layout), heads.safetensors, a model card
    checkpoints/last      the training state --resume continues from

and one MLflow run: params, the data as a dataset input, loss and lr per step, validation metrics per epoch, test
metrics per criterion, the files above and figures.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import train
from card import model_card
from checkpoint import find_complete_dir, load_last, save_last
from config import Config, load_yaml_config, save_config
from data import data_sha256
from errorpage import write_error_page
from files import output_dir_lock, write_jsonl, write_text_atomic
from models import TASKS
from rundir import (
    ERROR_PAGE,
    PREDICTION_FILES,
    check_output_dir,
    check_resume,
    check_resumed_data,
    clear_replaced_run,
    resolve_run,
    saved_run_id,
    write_run_files,
)
from scoring import summary_table
from tracking import TRAIN_LOSS, TRAIN_LR, Tracker, log_figures, log_run_inputs, tracked_metrics
from utils import UserError, code_version, dumps, system_info

log = logging.getLogger("redsm5")


def start_run(cfg: Config, accelerator, out_dir: Path, resuming: bool, prepare=train.prepare_data) -> tuple:
    """(prepared data, data digest): checked against the run's record on --resume, recorded for a new run."""
    if resuming:  # every process checks, so that all stop together
        record = check_resume(cfg, out_dir)
        data_digest = record["data_sha256"]
        prepared = train.prepare_data(cfg, saved_tokenizer=out_dir / "tokenizer")
        check_resumed_data(prepared, out_dir, record)
    else:
        prepared, data_digest = prepare(cfg), data_sha256(cfg)
        if accelerator.is_main_process:
            write_run_files(cfg, prepared, out_dir, data_digest)
    sizes = [len(x) for name in ("train", "val", "test") for x in prepared.features[name]]
    log.info("task %s: %d train / %d val / %d test examples (%d / %d / %d model inputs)", cfg.task, *sizes[::2],
             *sizes[1::2])
    return prepared, data_digest


def run_hooks(cfg: Config, accelerator, tracker: Tracker, last_dir: Path, on_validation, best_info: dict):
    """The loop's hooks (train.Hooks) for a run: MLflow, a console line every 30 s where stderr is a file (no bar
    there), checkpoints/last, and the caller's `on_validation(epoch, metrics, step, total_steps)`."""
    headline, line_due = (train.main_metric(cfg), *TASKS[cfg.task].headline), [time.perf_counter() + 30]
    quiet = not accelerator.is_main_process or sys.stderr.isatty()

    def logged(step: int, loss: float, lr: float) -> None:
        tracker.log_metrics({TRAIN_LOSS: loss, TRAIN_LR: lr}, step=step)
        if not quiet and time.perf_counter() > line_due[0]:
            line_due[0] = time.perf_counter() + 30
            log.info("step %d: loss %.4f, lr %.2e", step, loss, lr)

    def validated(epoch: int, metrics: dict, step: int, total_steps: int) -> None:
        tracker.log_metrics(tracked_metrics(metrics, "val", headline), step=step, flush=True)
        if on_validation:
            on_validation(epoch, metrics, step, total_steps)

    def save_state(state, scheduler) -> None:
        tracker.flush()  # the MLflow history of a resumed run then has no hole
        state.run_id = tracker.run_id
        save_last(accelerator, last_dir, state, scheduler, cfg.keep_checkpoints)

    return train.Hooks(logged=logged, validated=validated, save_state=save_state, best_info=best_info,
                       card=model_card)


def run(cfg: Config, accelerator=None, on_validation=None, parent_run_id: str | None = None,
        prepare=train.prepare_data, config_file: str | None = None) -> dict:
    """Train one run in cfg.output_dir. Returns {"val", "test", ["test_shift",] "train"}. `on_validation(epoch,
    val_metrics, step, total_steps)` is called after every validation (HPO prunes there). `parent_run_id` nests
    this run's MLflow run under another (an HPO study, a cross-validation); `prepare`: train.prepare_data, or a
    cached one (hpo.py); `config_file`: the --config the settings came from (never written over). A run that raises
    is ended in MLflow as KILLED (Ctrl-C) or FAILED, not left RUNNING."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    accelerator = train.setup_process(cfg, accelerator)
    cfg = resolve_run(cfg, accelerator)
    out_dir = Path(cfg.output_dir)
    best_dir, last_dir = out_dir / "checkpoints" / "best", out_dir / "checkpoints" / "last"
    with contextlib.ExitStack() as scope:  # the lock, then the MLflow run: released / ended however we leave
        scope.push(lambda kind, e, tb: setattr(e, "run_dir", out_dir) if kind and issubclass(kind, KeyboardInterrupt)
                   else None)  # a stopped run says where it is (train.main tells how to resume it)
        # the folder rule before the lock writes its file there, and again under the lock (no run ends meanwhile)
        check_output_dir(cfg, out_dir, config_file)
        scope.enter_context(output_dir_lock(out_dir, accelerator.is_main_process))
        check_output_dir(cfg, out_dir, config_file)
        if accelerator.is_main_process and not cfg.resume:
            clear_replaced_run(out_dir)
        accelerator.wait_for_everyone()
        resume_from = load_last(last_dir) if cfg.resume else None
        if resume_from:
            cfg = fallen_back_batch(cfg, out_dir)
        prepared, data_digest = start_run(cfg, accelerator, out_dir, resume_from is not None, prepare)
        # the training corpus alone, by content: evaluate.py --data_dir tells it from another corpus by this
        corpus_digest = data_sha256(dataclasses.replace(cfg, test_shift_dir=None, splits_file=None)) \
            if cfg.test_shift_dir or cfg.splits_file else data_digest
        tracker = scope.enter_context(Tracker(cfg, accelerator.is_main_process, parent_run_id=parent_run_id,
                                              run_id=saved_run_id(resume_from) if resume_from else None))
        if not resume_from:
            log_run_inputs(tracker, cfg, prepared.report, data_digest)
        log.info("run folder %s; %s", out_dir, tracker.where())
        scope.enter_context(logging_redirect_tqdm())  # log lines go above the bar, not into it
        hooks = run_hooks(cfg, accelerator, tracker, last_dir, on_validation, {"corpus_sha256": corpus_digest})
        cfg, (results, predictions, state) = train_fitting_memory(cfg, accelerator, prepared, out_dir, resume_from,
                                                                  hooks)
        if results["train"]["batch_fallbacks"]:  # MLflow params are set once: the batch that trained goes beside them
            fell = "; ".join(f"out of memory at step {e['step']} with batch {e['batch_size']}"
                             for e in results["train"]["batch_fallbacks"])
            tracker.log_params({"ran_batch_size": cfg.batch_size, "ran_grad_accum": cfg.grad_accum, "batch_fallbacks":
                                f"{fell} (train_loss points up to those steps include the failed attempts')"})
        results["train"].update(mlflow_run_id=tracker.run_id, resumed=resume_from is not None, ran_with={
            "device": accelerator.device.type, "mixed_precision": cfg.mixed_precision,
            "distributed_type": accelerator.distributed_type.name,
            "tf32": accelerator.device.type == "cuda" and cfg.tf32})
        if accelerator.is_main_process:
            write_outputs(out_dir, cfg, results, predictions, state, tracker)
            if "test" in predictions:
                page = write_error_page(out_dir / ERROR_PAGE, predictions["test"], prepared.features["test"][0],
                                        results["test"], f"{cfg.task}: errors on the test split of {out_dir}")
                tracker.log_artifact(page)
            finish_best(best_dir, cfg, results, prepared.splits, tracker)
            tracker.flush()  # what MLflow did not get is known only now
            results["train"].update(tracker.unlogged())
            write_text_atomic(out_dir / "run_stats.json", json.dumps({**results["train"], "system": system_info(),
                                                                      "code_version": code_version()}, indent=2))
            tracker.log_artifact(out_dir / "run_stats.json")
            written = ["metrics.json", *(["predictions.jsonl", ERROR_PAGE] if "test" in predictions else []),
                       "checkpoints/best"]
            log.info("done: %s (%s); %s", out_dir, ", ".join(written), tracker.where())
    return results


# --------------------------------------------------------------------------- out of memory: half the batch

def train_fitting_memory(cfg: Config, accelerator, prepared, out_dir: Path, resume_from: Path | None,
                         hooks: train.Hooks) -> tuple[Config, tuple]:
    """(the config that trained, train.train's results): a training step out of memory restarts the training at half
    the per-process batch and twice the gradient accumulation (the same effective batch when the batch was even),
    down to batch 1. What accelerate's find_executable_batch_size does, with the accumulation kept, each fallback
    recorded (config.yaml, run_stats.json `batch_fallbacks`), and one process only: under several, the others would
    wait for the failed one in an all-reduce. The restart begins where this invocation began (a new run: from
    scratch, its checkpoints/last removed; a resume: from the state it resumed)."""
    from accelerate.utils.memory import clear_device_cache

    fallbacks = []
    while True:
        try:
            results = train.train(cfg, accelerator, prepared, out_dir, resume_from, hooks)
            break
        except train.OutOfMemory as e:
            if cfg.batch_size == 1 or accelerator.num_processes > 1:
                how = "lower --max_length, or try --gradient_checkpointing true or --mixed_precision bf16" \
                    if cfg.batch_size == 1 else "give a smaller --batch_size and a larger --grad_accum"
                raise UserError(f"{e}: {how}") from None
            event = {"step": e.step, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "error": str(e)}
        accelerator.free_memory()  # outside the except: the failed step's tensors are released with its traceback
        clear_device_cache(garbage_collection=True)
        cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2, grad_accum=cfg.grad_accum * 2)
        accelerator.gradient_accumulation_steps = cfg.grad_accum
        fallbacks.append({**event, "to_batch_size": cfg.batch_size, "to_grad_accum": cfg.grad_accum})
        log.warning("out of memory at step %d with --batch_size %d: training again from %s at --batch_size %d "
                    "--grad_accum %d", event["step"], event["batch_size"], "the resumed state" if resume_from else
                    "the start", cfg.batch_size, cfg.grad_accum)
        if accelerator.is_main_process:
            save_config(cfg, out_dir / "config.yaml")  # what trains now: a resume continues at this batch
            if resume_from is None:  # a state of the failed attempt is not this run's
                for stale in [out_dir / "checkpoints" / "last", *out_dir.glob("checkpoints/step-*")]:
                    shutil.rmtree(stale, ignore_errors=True)
    results[0]["train"]["batch_fallbacks"] = fallbacks
    return cfg, results


def fallen_back_batch(cfg: Config, out_dir: Path) -> Config:
    """A resume of a run whose batch an out-of-memory fallback halved (config.yaml says so: a smaller batch, the
    same effective batch) continues at that batch when it is asked for the batch the run started with: a requeued
    job repeats its first command line."""
    try:
        saved = load_yaml_config(out_dir / "config.yaml")
    except UserError:  # missing or damaged: check_resume names it
        return cfg
    batch, accum = saved.get("batch_size"), saved.get("grad_accum")
    halvings = range(1, cfg.batch_size.bit_length())
    if any((batch, accum) == (cfg.batch_size >> k, cfg.grad_accum << k) for k in halvings):
        log.info("--resume: this run fell back to --batch_size %d --grad_accum %d after running out of memory; "
                 "it continues so", batch, accum)
        return dataclasses.replace(cfg, batch_size=batch, grad_accum=accum)
    return cfg


# --------------------------------------------------------------------------- what a finished run leaves

def write_outputs(out_dir: Path, cfg: Config, results: dict, predictions: dict, state, tracker: Tracker) -> None:
    """The predictions, metrics.json, history.json; the test metrics and files to MLflow. Main process only."""
    for name, rows in predictions.items():  # validation predictions too: report.py chooses its threshold on them
        write_jsonl(rows, out_dir / PREDICTION_FILES[name])
    # metrics.json holds only what the model scored, so reruns can be compared bit for bit; timings go beside it.
    scored = [n for n in PREDICTION_FILES if n in ("val", "test") or results.get(n)]  # test_shift when there is one
    write_text_atomic(out_dir / "metrics.json", dumps({n: results[n] for n in scored}, indent=2))
    metric_name = train.main_metric(cfg)
    history = {"metric": metric_name, "val": state.history,  # training curves, also without MLflow
               "steps": [dict(zip(("step", "train_loss", "lr"), row)) for row in state.curve]}
    write_text_atomic(out_dir / "history.json", json.dumps(history))
    tuned = ", ".join(sorted(k for k, v in state.thresholds.items() if v not in (None, {}))) or "none: 0.5"
    log.info("%s, best checkpoint (thresholds tuned on val: %s):\n%s", cfg.task, tuned,
             summary_table(results, TASKS[cfg.task].headline))
    headline = (metric_name, *TASKS[cfg.task].headline)
    for name in scored:
        if results[name]:
            tracker.log_metrics(tracked_metrics(results[name], "best_val" if name == "val" else name, headline,
                                                per_criterion=name != "val"), step=state.global_step)
    per = {name: (results[name] or {}).get("per_criterion_f1", {}) for name in scored}
    if any(per.values()):  # one table to read them side by side (Artifacts tab)
        criteria = list(next(v for v in per.values() if v))
        tracker.log_table({"criterion": criteria, **{f"{n}_f1": [per[n].get(c) for c in criteria] for n in per
                                                     if per[n]}}, "per_criterion_f1.json")
    for f in ("config.yaml", "metrics.json", "splits.json", "history.json"):
        tracker.log_artifact(out_dir / f)
    if tracker.enabled:
        log_figures(tracker, out_dir, results, history, predictions)


def finish_best(best_dir: Path, cfg: Config, results: dict, splits: dict, tracker: Tracker) -> None:
    """The best checkpoint's model card rewritten with its test metrics; the card to the run's artifacts, and, when
    asked (--mlflow_log_model), the checkpoint as a pyfunc model (mlflow_model.py). Main process only."""
    found = find_complete_dir(best_dir)
    if found is None:
        return
    n_params = json.loads((found / "checkpoint.json").read_text()).get("encoder_parameters", 0)
    write_text_atomic(found / "README.md", model_card(cfg, results, n_params, splits))
    tracker.log_artifact(found / "README.md")
    if cfg.mlflow_log_model and tracker.enabled and tracker.failure is None:
        from mlflow_model import log_model

        tracker.flush()
        try:
            log_model(found, tracker.run_id, tracker.uri, cfg.mlflow_register_model)  # it logs the model's URI
        except Exception as e:  # tracking is a side channel: the run's own outputs are written already
            log.warning("--mlflow_log_model: the model was not logged (%s)", str(e).splitlines()[0][:200])
            tracker.lost_items.append("model")
