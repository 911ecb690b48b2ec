"""The run folder: where a run goes, what it records of itself, and what a resume checks before it continues
(what a finished run leaves there: runner.py).

A new run gets a folder of its own (`--output_dir auto`: outputs/<task>/<date>_<time>); a folder that holds a run
is continued only with --resume and replaced only with --overwrite_output_dir. A run records config.yaml,
splits.json, tokenizer/ and run.json (the content digests of its data, split and tokenizer), each written whole;
a resume compares them all, and refuses in one line what it cannot continue as the same run.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoint import read_json_file, save_tokenizer
from config import DATA_FIELDS, RESUMABLE_FIELDS, Config, load_yaml_config, save_config
from data import data_sha256
from files import folder_written_whole, write_text_atomic
from utils import UserError, code_version

log = logging.getLogger("redsm5")


PREDICTION_FILES = {"val": "val_predictions.jsonl", "test": "predictions.jsonl",
                    "test_shift": "shift_predictions.jsonl"}
ERROR_PAGE = "error_page.html"  # the test split's errors, worst first (errorpage.py)


RUN_RECORD = "run.json"  # what a run trains on, by content: what --resume compares before it continues


PATH_FIELDS = ("data_dir", "splits_file", "test_shift_dir", "output_dir")


RECORD_KEYS = ("data_sha256", "splits_sha256", "tokenizer_sha256")


def sha256_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def folder_sha256(folder: Path) -> str:
    """A folder's files by name and content (the COMPLETE marker of a swapped-in folder left out)."""
    return sha256_of([[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in sorted(folder.iterdir())
                      if f.is_file() and f.name != "COMPLETE"])


def same_setting(name: str, saved, now) -> bool:
    """Paths compare by what they point to: `data/` and `./data` are one folder, and a run folder that was moved
    resumes where it is now."""
    if name in PATH_FIELDS and saved is not None and now is not None:
        return os.path.realpath(saved) == os.path.realpath(now)
    return saved == now


def holds_its_split(splits_file, out_dir: Path) -> bool:
    """Whether a split file holds the split the run in out_dir trained on (its own splits.json, compared as JSON),
    wherever the file lives now: a moved or copied report folder carries its split files with it."""
    try:
        return json.loads(Path(splits_file).read_text()) == json.loads((out_dir / "splits.json").read_text())
    except (OSError, TypeError, ValueError):
        return False


def read_run_record(out_dir: Path) -> tuple[dict, dict]:
    """(saved config, run.json) of the run to resume. Missing, empty or unreadable is a refusal, not a pass:
    without them nothing says what the run trained on."""
    config_file, record_file = out_dir / "config.yaml", out_dir / RUN_RECORD
    for f in (config_file, record_file):
        if not f.is_file() or f.stat().st_size == 0:
            raise UserError(f"--resume: {f} is missing or empty: nothing records what this run trained on, so it "
                            "cannot be continued safely; start a new run (another --output_dir, or no --resume)")
    try:
        saved = load_yaml_config(config_file)
        record = json.loads(record_file.read_text())
    except (UserError, ValueError) as e:
        raise UserError(f"--resume: {config_file.parent}: its run record is damaged ({str(e)[:150]})") from None
    missing = [k for k in DATA_FIELDS if k not in saved] + [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise UserError(f"--resume: {config_file} / {record_file.name} lack {', '.join(missing[:4])}: the record of "
                        "what this run trained on is incomplete; start a new run")
    return saved, record


def check_resume(cfg: Config, out_dir: Path) -> dict:
    """A resume must continue the same run: a changed seed would redraw the split (test posts trained on), changed
    data content would put other posts in the test split, a changed model would mix two runs. Those are refused
    (the settings, then the data by content); the harmless changes are logged. Returns the run record."""
    saved, record = read_run_record(out_dir)
    now = asdict(cfg)
    changed = {k: (saved[k], now[k]) for k in now if k in saved and not same_setting(k, saved[k], now[k])}
    refused = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in RESUMABLE_FIELDS
               and not (k == "splits_file" and holds_its_split(b, out_dir))]
    if refused:
        raise UserError(f"--resume: {out_dir / 'config.yaml'} was trained with other settings "
                        f"({', '.join(refused[:4])}); resume with the saved values, or give another --output_dir")
    data_digest = data_sha256(cfg)  # after the settings: a wrong --data_dir is named as a changed setting
    if record["data_sha256"] != data_digest:
        raise UserError(f"--resume: the data changed since this run started (content sha256 "
                        f"{record['data_sha256'][:12]} -> {data_digest[:12]}): its split would no longer keep test "
                        "posts out of training; start a new run on the new data")
    if len(changed) > 1:
        log.info("resuming with changed settings: %s", {k: v for k, v in changed.items() if k != "resume"})
    return record


def check_resumed_data(prepared, out_dir: Path, record: dict) -> None:
    """The split and the tokenizer a resume rebuilt or read back are the ones the run saved."""
    if sha256_of(prepared.splits) != record["splits_sha256"] or not (out_dir / "splits.json").is_file() \
            or json.loads((out_dir / "splits.json").read_text()) != prepared.splits:
        raise UserError(f"--resume: {out_dir / 'splits.json'} differs from the split this run trained on (edited, "
                        "damaged or missing); start a new run")
    if folder_sha256(out_dir / "tokenizer") != record["tokenizer_sha256"]:
        raise UserError(f"--resume: {out_dir / 'tokenizer'} differs from the tokenizer this run trained with "
                        "(edited or damaged); start a new run")


def write_run_files(cfg: Config, prepared, out_dir: Path, data_digest: str) -> None:
    """A new run's record, each file whole or not at all: config.yaml, splits.json, tokenizer/, and last run.json
    (the digests a resume compares). A resumed run rewrites none of them. Main process only."""
    save_config(cfg, out_dir / "config.yaml")
    write_text_atomic(out_dir / "splits.json", json.dumps(prepared.splits))
    with folder_written_whole(out_dir / "tokenizer") as tmp:
        save_tokenizer(prepared.tokenizer, tmp, cfg.max_length)
    record = {"data_sha256": data_digest, "splits_sha256": sha256_of(prepared.splits),
              "tokenizer_sha256": folder_sha256(out_dir / "tokenizer"), "code_version": code_version()}
    write_text_atomic(out_dir / RUN_RECORD, json.dumps(record, indent=2))


def saved_run_id(last_dir: Path) -> str | None:
    """The MLflow run that a resumed run continues: the one its training state recorded."""
    return read_json_file(last_dir / "trainer_state.json", "trainer_state.json").get("run_id")


def new_run_dir(task: str) -> str:
    """outputs/<task>/<date>_<time>, unique: a plain `python train.py` never lands on an earlier run."""
    base = Path("outputs") / task / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def resolve_run(cfg: Config, accelerator) -> Config:
    """What actually runs, recorded in config.yaml: the folder of `--output_dir auto` (one name for all processes)
    and the mixed precision the device gives. A setting that cannot apply here gets one warning line."""
    changes = {}
    if cfg.output_dir == "auto":
        if cfg.resume:
            raise UserError("--resume: give the --output_dir of the run to continue")
        name = [new_run_dir(cfg.task)]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(name)
        changes["output_dir"] = name[0]
    cpu = accelerator.device.type == "cpu"
    effective = "no" if cpu and accelerator.mixed_precision == "fp16" else accelerator.mixed_precision
    notes = []
    if cpu and accelerator.mixed_precision == "fp16":
        notes.append("--mixed_precision fp16: not on a CPU (accelerate ignores it); this run trains in fp32")
    if cpu and effective == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        notes.append("--mixed_precision bf16: this CPU has no bf16 instructions; autocast will be slower than fp32")
    if cpu and cfg.cudnn_attention:
        notes.append("--cudnn_attention: a GPU setting; no effect on a CPU")
    if cpu and not cfg.tf32:
        notes.append("--tf32 false: a GPU setting; no effect on a CPU")
    for plugin in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):  # an accelerate config the launcher could not apply
        if os.environ.get(f"ACCELERATE_USE_{plugin}", "").lower() == "true" and \
                accelerator.distributed_type.name != plugin:
            notes.append(f"the accelerate config asks for {plugin}, which does not apply here: this run is "
                         f"{accelerator.distributed_type.name} on {accelerator.num_processes} process(es)")
    for note in notes if accelerator.is_main_process else ():
        log.warning(note)
    if cfg.mixed_precision != effective:
        changes["mixed_precision"] = effective
    return dataclasses.replace(cfg, **changes) if changes else cfg


def checkpoint_folder(folder: Path) -> bool:
    """A folder of weights: our checkpoints/best (checkpoint.json) or checkpoints/last (trainer_state.json), or a
    save_pretrained folder (config.json beside its weights)."""
    return any((folder / name).is_file() for name in ("checkpoint.json", "trainer_state.json")) or \
        ((folder / "config.json").is_file() and any((folder / w).is_file() for w in ("model.safetensors",
                                                                                     "pytorch_model.bin")))


def check_output_dir(cfg: Config, out_dir: Path, config_file: str | None = None) -> None:
    """The one rule of what a run may write over, checked before anything is written. Never a checkpoint folder or
    a folder inside one or inside another run's folder (a run in checkpoints/best wrote its config.yaml and
    splits.json over the checkpoint's); a folder that holds a run only with --resume (the same run, continued) or
    --overwrite_output_dir (replaced: clear_replaced_run); and never config.yaml over the --config file it was read
    from (a new run writes its resolved config there, and the user's file with its comments would be gone)."""
    where = Path(os.path.realpath(out_dir))
    if not (cfg.resume and (where / RUN_RECORD).is_file()):  # the same run, continued, writes only into itself
        for folder in (where, *where.parents):
            if checkpoint_folder(folder):
                raise UserError(f"--output_dir {out_dir}: {'is' if folder == where else 'is inside'} the checkpoint "
                                f"folder {folder}: a run would write over its files; give a folder of its own "
                                "(default: a new one under outputs/)")
            if folder != where and (folder / RUN_RECORD).is_file():
                raise UserError(f"--output_dir {out_dir}: is inside the folder of another run, {folder} (its "
                                f"{RUN_RECORD}): a run would write over that run's files; give a folder outside it")
    held = [f for f in (RUN_RECORD, "metrics.json") if (out_dir / f).exists()]
    if held and not (cfg.resume or cfg.overwrite_output_dir):
        raise UserError(f"--output_dir {out_dir}: holds a run ({held[0]}); continue it with --resume true, replace it "
                        "with --overwrite_output_dir true, or give another --output_dir (default: a new folder)")
    if config_file and not cfg.resume and (where / "config.yaml").is_file() \
            and os.path.samefile(config_file, where / "config.yaml"):
        raise UserError(f"--config {config_file}: is the config.yaml this run writes in --output_dir {out_dir}, where "
                        "its resolved config would replace your file; keep your config outside the run folder, or "
                        "give another --output_dir")


def clear_replaced_run(out_dir: Path) -> None:
    """--overwrite_output_dir: nothing of the old run may pass for the new one's (its checkpoints/last above all).
    Main process only."""
    if not any((out_dir / f).exists() for f in (RUN_RECORD, "metrics.json")):
        return
    log.info("--overwrite_output_dir: replacing the run in %s", out_dir)
    for name in (RUN_RECORD, "metrics.json", "run_stats.json", "history.json", ERROR_PAGE, *PREDICTION_FILES.values()):
        (out_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "figures"):  # renamed away first: a kill never leaves half a folder
        if (out_dir / name).exists():
            trash = out_dir / f".{name}.replaced-{os.getpid()}"
            (out_dir / name).rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
