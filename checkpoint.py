"""Checkpoints: the best model in the Hugging Face layout with its model card, and the training state that
--resume continues from. No pickle anywhere: safetensors, JSON and YAML; a damaged file is one error naming it.

checkpoints/best/ is a folder the Hugging Face tools read: encoder/ (and span_encoder/ for a joint model with two
encoders) is a save_pretrained folder with its tokenizer, so AutoModel / AutoTokenizer.from_pretrained load the
fine-tuned encoder alone; heads.safetensors holds the task heads; config.yaml, checkpoint.json, splits.json and a
README.md model card describe the run. checkpoints/last/ is accelerate's save_state plus trainer_state.json.
Both are written under a temporary name and swapped in whole (files.folder_written_whole).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

import data
from config import Config, load_yaml_config, make_config, post_encoding, shown
from files import find_complete_dir, folder_written_whole
from lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_digest, is_adapter, load_lora
from models import TASKS, TaskModel, attention, build_encoder, drop_pooler
from utils import UserError, first_line

log = logging.getLogger("redsm5")

ENCODERS = ("encoder", "span_encoder")  # TaskModel attributes, each saved as a save_pretrained folder
HEADS = "heads.safetensors"


@contextlib.contextmanager
def quiet_transformers():
    """save_pretrained / from_pretrained draw a progress bar per call and report the pooler we dropped as
    missing: noise in a training log. Both settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def split_state(state: dict) -> dict[str, dict]:
    """Full TaskModel weights -> {"encoder", "span_encoder": their own keys (prefix removed), "heads": the rest}.
    By key prefix, so the full state dict that accelerator.get_state_dict gathers under FSDP splits the same way."""
    parts = {name: {} for name in (*ENCODERS, "heads")}
    for key, value in state.items():
        name = next((n for n in ENCODERS if key.startswith(n + ".")), "heads")
        parts[name][key if name == "heads" else key[len(name) + 1:]] = value
    return parts


def save_checkpoint(model: TaskModel, tokenizer, cfg: Config, path: Path, extra: dict | None = None,
                    state_dict: dict | None = None, card: str | None = None) -> None:
    """encoder/ (+ span_encoder/) as save_pretrained folders with the tokenizer, heads.safetensors, config.yaml,
    checkpoint.json (`extra`) and README.md (`card`, when given).
    `state_dict`: the full weights when the model is sharded (accelerator.get_state_dict, FSDP)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    parts = split_state(state)
    if cfg.lora:  # the adapter's base, named by --model, is checked against this when it loads
        extra = {**(extra or {}), "lora_base_sha256": base_digest(parts["encoder"])}
    with quiet_transformers():
        for name in ENCODERS:
            if getattr(model, name) is not None:  # save_pretrained pops what it writes: it gets its own dict
                getattr(model, name).save_pretrained(str(path / name), state_dict=parts[name])
                save_tokenizer(tokenizer, path / name, cfg.max_length)
    labels = label_map(cfg, model)
    save_file(parts["heads"], str(path / HEADS), metadata={"task": cfg.task, "format": "pt",
                                                           "labels": json.dumps(labels)})
    (path / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    # the config once more, beside config.yaml: an edit of config.yaml (max_length, encoding) is then noticed
    (path / "checkpoint.json").write_text(json.dumps({"task": cfg.task, **(extra or {}), "labels": labels,
                                                      "config": asdict(cfg)}, indent=2))
    if card is not None:
        (path / "README.md").write_text(card)


def save_tokenizer(tokenizer, folder: Path, max_length: int) -> None:
    """save_pretrained with model_max_length = the run's max_length (a trained-from-texts tokenizer says 1e30, and
    `truncation=True` then lets 6,000 tokens through); the tokenizer in memory is left as it was."""
    before = tokenizer.model_max_length
    tokenizer.model_max_length = max_length
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.model_max_length = before


def label_map(cfg: Config, model: TaskModel) -> dict:
    """Which rows of the heads are which criterion, and the text each was trained with: what a user needs to read a
    prediction off the weights by hand (heads.safetensors metadata and checkpoint.json)."""
    per_token = model.per_token if model.span_head is not None else 0
    criteria = data.SYMPTOMS if cfg.criterion_heads else ["ALL"]
    rows = []
    for i, name in enumerate(criteria):
        row = {"name": name, "description": data.CRITERIA.get(name, "one head for every criterion")}
        if model.cls_head is not None:
            row["cls_head_rows"] = [2 * i, 2 * i + 1]  # softmax over the two: [not shown, shown]
        if per_token:
            row["evidence_head_rows"] = list(range(per_token * i, per_token * (i + 1)))  # start, end / tag
        rows.append(row)
    return {"criteria": rows, "pooling": cfg.pooling, "evidence_head": cfg.evidence_head if per_token else None,
            "encoding": cfg.encoding, "input": "[CLS] text [SEP], every criterion's rows read" if post_encoding(cfg)
            else "[CLS] criterion description [SEP] text [SEP]"}


# --------------------------------------------------------------------------- loading, with damaged-file checks

def resolve_checkpoint(path: str | Path) -> Path:
    """The folder to load: `path`, or its complete `.old` copy when a save was killed between its renames."""
    path = Path(path)
    found = find_complete_dir(path)
    if found is not None and found != path:
        log.warning("%s: not there or not complete (a save was interrupted); loading its complete copy %s",
                    path, found)
    return found or path  # checkpoints written before the COMPLETE marker load as they are


def read_json_file(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from `path`; a damaged file (not UTF-8, not JSON, not an object) is a UserError naming it."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid {what} ({first_line(e)}): the checkpoint is damaged") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or first_line(e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a valid {what} (expected a JSON object, got {type(value).__name__})")
    return value


def check_safetensors(path: Path) -> None:
    """Reads only the header, which safetensors checks against the file size: a truncated or foreign file fails."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the weights ({first_line(e)}): truncated or not a safetensors "
                        "file") from None


def encoder_folders(cfg: Config) -> list[str]:
    return list(ENCODERS) if cfg.task == "joint" and not cfg.shared_encoder else ["encoder"]


def check_checkpoint_files(path: Path) -> None:
    """Every file a checkpoint needs is there (an older layout is named as such), before anything is parsed."""
    if (path / "model.safetensors").exists() and (path / "encoder_config.json").exists():
        raise UserError(f"{path}: a checkpoint written by an older version of this code (model.safetensors + "
                        "encoder_config.json): retrain, or evaluate it with the version that wrote it")
    adapter = is_adapter(path / "encoder")
    encoder = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] if adapter else ["config.json", "model.safetensors"]
    needed = [f"encoder/{name}" for name in encoder] + ["encoder/tokenizer_config.json", HEADS,
              "config.yaml", "checkpoint.json"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")


def check_encoder_folder(folder: Path, cfg: Config) -> None:
    """Its JSON files and config parse: a damaged one is named here, not as a bare JSON error later."""
    from transformers import AutoConfig

    for f in sorted(folder.glob("*.json")):
        read_json_file(f, {"config.json": "encoder config", ADAPTER_CONFIG: "LoRA adapter config"}.get(f.name,
                                                                                                     "tokenizer file"))
    if cfg.lora:  # the adapter; its base encoder is --model's, checked as it loads
        check_safetensors(folder / ADAPTER_WEIGHTS)
        return
    try:
        AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder / 'config.json'}: not a valid encoder config ({first_line(e)})") from None
    check_safetensors(folder / "model.safetensors")


def load_encoder(folder: Path, cfg: Config):
    """A save_pretrained folder (checked by check_encoder_folder), read by from_pretrained as any user would,
    strictly: only the pooler (which we drop) may be missing."""
    from transformers import AutoModel

    try:
        with quiet_transformers(), torch.random.fork_rng(devices=[]):  # the pooler's init draws random numbers
            encoder, info = AutoModel.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code,
                                                      output_loading_info=True, **attention(cfg, loading=True))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: other shapes
        raise UserError(f"{folder}: cannot build its encoder ({first_line(e)[:150]})") from None
    problems = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    problems += sorted(info["unexpected_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if problems:
        raise UserError(f"{folder / 'model.safetensors'}: weights do not match its config.json "
                        f"(missing or unexpected {problems[:3]})")
    return drop_pooler(encoder)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers raises plain Exceptions; any failure here means a broken folder
        raise UserError(f"{folder}: cannot load the tokenizer ({first_line(e)}): the checkpoint is damaged") \
            from None


def check_thresholds(thresholds, where: Path) -> None:
    """checkpoint.json's thresholds, tuned on validation, are what training saves: {name: a number or null}, and
    paper_thresholds {symptom: a number} for every symptom. Anything else (an edit, a list) is named here, not a
    TypeError deep in the scoring."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    problem = None
    if thresholds is not None and not isinstance(thresholds, dict):
        problem = f"a {type(thresholds).__name__}, not a mapping of names to numbers"
    for name, value in (thresholds.items() if isinstance(thresholds, dict) else ()):
        if name == "paper_thresholds" and value:
            if not isinstance(value, dict) or set(value) != set(data.SYMPTOMS) or not all(map(number, value.values())):
                problem = "paper_thresholds is not a number for each of the nine symptoms"
        elif name != "paper_thresholds" and value is not None and not number(value):
            problem = f"{name} is {shown(value)}, not a number"
    if problem:
        raise UserError(f"{where}: its thresholds are damaged ({problem}); restore the file as training wrote it")


def load_checkpoint(path: str | Path, expect_task: str | None = None):
    """(model, tokenizer, cfg, extra) from a folder written by `save_checkpoint`. No pickle involved.
    A damaged file (truncated weights, corrupt JSON, a broken tokenizer) is a UserError naming it."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    check_checkpoint_files(path)
    try:
        cfg = make_config(**load_yaml_config(path / "config.yaml"))
    except UserError as e:  # a value out of range names the file, not a flag the user never gave
        message = str(e)
        raise UserError(message if message.startswith(str(path)) else f"{path / 'config.yaml'}: {message}") from None
    extra = read_json_file(path / "checkpoint.json", "checkpoint.json")
    check_thresholds(extra.get("thresholds"), path / "checkpoint.json")
    saved = extra.get("config")
    if isinstance(saved, dict):
        edited = [k for k, v in asdict(cfg).items() if k in saved and saved[k] != v]
        if edited:
            raise UserError(f"{path / 'config.yaml'}: edited after the checkpoint was saved ({', '.join(edited[:4])} "
                            "differ from checkpoint.json): the model was trained with the saved values; restore them")
    if expect_task and cfg.task != expect_task:
        raise UserError(f"{path}: checkpoint of task '{cfg.task}', expected '{expect_task}'")
    folders = encoder_folders(cfg)
    if is_adapter(path / "encoder") != cfg.lora:
        raise UserError(f"{path / 'encoder'}: {'a LoRA adapter' if not cfg.lora else 'a whole encoder'}, but "
                        f"config.yaml says lora: {str(cfg.lora).lower()}: the checkpoint is damaged")
    weights = ADAPTER_WEIGHTS if cfg.lora else "model.safetensors"
    if not (path / folders[-1] / weights).exists():
        raise UserError(f"{path}: not a complete checkpoint (missing {folders[-1]}/{weights})")
    for name in folders:
        check_encoder_folder(path / name, cfg)
    tokenizer = load_tokenizer(path / "encoder")
    if cfg.lora:  # the base encoder, as training loaded it; the adapters go on after the heads are built
        with quiet_transformers(), torch.random.fork_rng(devices=[]):
            encoders = [build_encoder(cfg, len(tokenizer), loading=True) for _ in folders]
    else:
        encoders = [load_encoder(path / name, cfg) for name in folders]
    try:
        model = TaskModel(TASKS[cfg.task], *encoders, dropout=cfg.dropout, criterion_heads=cfg.criterion_heads,
                          pooling=cfg.pooling, evidence_head=cfg.evidence_head)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot build a '{cfg.task}' model ({first_line(e)})") from None
    if cfg.lora:
        load_lora(model, {name: path / name for name in folders}, cfg.model)
        if base_digest(model.encoder.state_dict()) != extra.get("lora_base_sha256"):
            raise UserError(f"{path}: --model {cfg.model} is not the encoder its LoRA adapter was trained on (its "
                            "weights differ from the sha256 in checkpoint.json): install the same version of it")
    check_safetensors(path / HEADS)
    heads = load_file(str(path / HEADS))
    try:
        missing, unexpected = model.load_state_dict(heads, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f"{path / HEADS}: weights do not match a '{cfg.task}' model ({first_line(e)[:150]})") \
            from None
    missing = [k for k in missing if not k.startswith(tuple(n + "." for n in ENCODERS))]
    if missing or unexpected:
        raise UserError(f"{path / HEADS}: weights do not match a '{cfg.task}' model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), tokenizer, cfg, extra


# --------------------------------------------------------------------------- during training: best and last

@dataclass
class LoopState:
    """Where training stands; saved with checkpoints/last as trainer_state.json, so a resume continues exactly."""
    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already trained on
    batch_size: int = 0  # the per-process micro-batch they were (an out-of-memory fallback halves it); 0: not recorded
    global_step: int = 0  # optimizer steps
    best: float | None = None  # best validation value of the main metric
    bad_epochs: int = 0  # validations without improvement, for --patience (each epoch's, or --eval_every's)
    thresholds: dict = field(default_factory=dict)  # tuned on validation for the best checkpoint (evaluate)
    run_id: str | None = None  # the MLflow run a resume continues
    history: list = field(default_factory=list)  # validation metric per validation, with its epoch and step
    curve: list = field(default_factory=list)  # [step, train loss, lr] per optimizer step, for history.json
    skipped_steps: int = 0  # non-finite losses skipped


def save_best(accelerator, model, tokenizer, cfg: Config, best_dir: Path, info: dict, splits: dict,
              card=None) -> None:
    """The best model so far as an evaluate.py checkpoint (Hugging Face layout, save_checkpoint), swapped in whole by
    folder_written_whole; with `card` (card.model_card), its model card of the validation metrics."""
    weights = accelerator.get_state_dict(model)  # a collective under FSDP: every process gathers
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}  # torch.compile's wrapper (dynamo_backend)
    if accelerator.is_main_process:
        with folder_written_whole(best_dir) as tmp:
            info = {**info, "encoder_parameters": sum(v.numel() for k, v in weights.items()
                                                      if k.startswith("encoder."))}
            text = card(cfg, {"val": info["val_metrics"]}, info["encoder_parameters"], splits) if card else None
            save_checkpoint(accelerator.unwrap_model(model, keep_torch_compile=False), tokenizer, cfg, tmp, info,
                            state_dict=weights, card=text)
            (tmp / "splits.json").write_text(json.dumps(splits))


def load_best(accelerator, model, best_dir: Path) -> None:
    """Read the best weights back from the checkpoint, exactly as evaluate.py will (load_checkpoint)."""
    accelerator.wait_for_everyone()
    best_weights = load_checkpoint(find_complete_dir(best_dir))[0].state_dict()
    if getattr(accelerator, "is_fsdp2", False):  # sharded: each process takes its shard of the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, best_weights, options=StateDictOptions(full_state_dict=True))
    else:
        accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(best_weights)


def save_last(accelerator, path: Path, state: LoopState, scheduler, keep: int = 1) -> None:
    """Full training state for --resume, swapped in whole (folder_written_whole).

    accelerate writes weights as safetensors and optimizer/RNG states as tensors that it reads back
    with torch.load(weights_only=True); the scheduler and loop state go to JSON. Nothing is unpickled.
    """
    main = accelerator.is_main_process
    with folder_written_whole(path, main) as tmp:
        accelerator.wait_for_everyone()  # the stale dst.tmp is gone before anyone writes
        accelerator.save_state(str(tmp), safe_serialization=True)
        if main:
            (tmp / "trainer_state.json").write_text(json.dumps({**asdict(state), "scheduler": scheduler.state_dict()},
                                                               indent=2))
        accelerator.wait_for_everyone()  # every process's files are in before the swap
    if main and keep > 1:  # older states stay as step-N copies, for rolling back by hand
        with folder_written_whole(path.with_name(f"step-{state.global_step:07d}")) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        for stale in sorted(path.parent.glob("step-*"))[: -(keep - 1)]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()


def load_last(path: Path) -> Path:
    """The complete training state to resume from: checkpoints/last, or its .old copy after a crash mid-save."""
    found = find_complete_dir(path)
    if found is None:
        raise UserError(f"{path}: no complete training state to resume from (missing or torn save)")
    return found


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def resume_state(accelerator, scheduler, resume_from: Path, cfg: Config) -> LoopState:
    """The training state of checkpoints/last, loaded into the prepared model, optimizer, loaders and scheduler.

    Every file is checked first, and anything damaged is an error that names it. That includes the random states,
    which accelerate skips with an INFO line when it cannot read them: the resumed run would then silently differ
    from an uninterrupted one, and --resume promises the same run."""
    saved = read_json_file(resume_from / "trainer_state.json", "trainer_state.json")
    missing = [k for k in ("scheduler", "epoch", "batches_done", "global_step") if k not in saved]
    if missing:
        raise UserError(f"{resume_from / 'trainer_state.json'}: lacks {', '.join(missing)}: the training state is "
                        "damaged; start a new run")
    for f in sorted(resume_from.glob("*.safetensors")):
        check_safetensors(f)
    rng_files = sorted(resume_from.glob("random_states_*.pkl"))
    if not rng_files:
        raise UserError(f"{resume_from}: no random_states_*.pkl: the resumed run would not be the same run")
    accelerate_log = logging.getLogger("accelerate.checkpointing")
    messages, level, propagate = _Messages(), accelerate_log.level, accelerate_log.propagate
    accelerate_log.addHandler(messages)
    accelerate_log.setLevel(logging.INFO)
    accelerate_log.propagate = False  # its INFO lines are for us to read, not for the console
    try:
        accelerator.load_state(str(resume_from))
    except RuntimeError as e:  # weights of another task or model size
        raise UserError(f"{resume_from}: cannot resume with --task {cfg.task} --model {cfg.model}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    except Exception as e:  # a foreign file under an expected name: torch.load(weights_only=True) refuses pickles
        raise UserError(f"{resume_from}: cannot read the training state ({type(e).__name__}: {first_line(e)}); "
                        "a damaged or foreign file: start a new run") from None
    finally:
        accelerate_log.removeHandler(messages)
        accelerate_log.setLevel(level)
        accelerate_log.propagate = propagate
    if any("Could not load random states" in m for m in messages.messages):
        raise UserError(f"{rng_files[0].parent}: cannot read {', '.join(f.name for f in rng_files)} (the random "
                        "states): the resumed run would not equal an uninterrupted one; restore the file, or start "
                        "a new run")
    try:
        scheduler.load_state_dict(saved.pop("scheduler"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{resume_from / 'trainer_state.json'}: a damaged scheduler state ({first_line(e)})") \
            from None
    # The schedule is this run's, built for its budget; the state gives only the position. The saved rate is the old
    # budget's (0.0 at its end), so it is recomputed at that position: a resume with a longer --max_steps or --epochs
    # then trains at the rates of an uninterrupted run of the new budget, not at the old schedule's end.
    scheduler.last_epoch -= 1
    scheduler.step()
    state = LoopState(**{f.name: saved[f.name] for f in dataclasses.fields(LoopState) if f.name in saved})
    log.info("resumed from %s at epoch %d, batch %d, step %d", resume_from, state.epoch, state.batches_done,
             state.global_step)
    return state
