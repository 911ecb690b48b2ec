"""Config, command line, seeding, hardware report and MLflow helpers.

Everything a run can change is one field of `Config`; YAML files and command-line flags only
override the defaults (precedence: dataclass defaults < --config YAML < --flags). This module
imports nothing else of ours, so every other file can use it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import platform
import random
import shlex
import shutil
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

log = logging.getLogger("redsm5")


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never a traceback."""


@dataclass
class Config:
    # --- task and data
    task: typing.Literal["criteria", "evidence", "joint"] = "criteria"  # what to train (models.TASKS)
    data_dir: str | None = None  # ReDSM5 csv folder; None = the generated demo corpus
    demo_posts: int = 1000  # size of the demo corpus when data_dir is None
    demo_seed: int = 0  # the demo corpus is a pure function of (demo_posts, demo_seed)
    unit: typing.Literal["sentence", "post"] = "sentence"  # criteria examples: annotated sentence, or post x 9 criteria
    include_negatives: bool = False  # evidence: also train (criterion, post) pairs without evidence, to the null answer
    include_special_case: bool = False  # keep ReDSM5 SPECIAL_CASE rows (dropped and counted otherwise)
    fuzzy_threshold: float = 0.3  # min word-sequence similarity to align a paraphrased sentence to a post sentence
    val_ratio: float = 0.1  # post-level split fractions; train gets the rest
    test_ratio: float = 0.1
    splits_file: str | None = None  # reuse the post split of an earlier run (its splits.json)
    demo_shift_posts: int = 200  # demo: posts of the shifted test set (held-out phrasing) scored as test_shift; 0: none
    test_shift_dir: str | None = None  # a second ReDSM5 folder scored as test_shift (replaces the demo's shift set)
    # --- model
    model: str = "tiny"  # "tiny" (built offline), "minilm" (pip package, models.SHORT_NAMES), a hub name or local dir
    # tiny encoder: ModernBERT (rotary positions, local+global attention) or BERT (learned absolute positions)
    tiny_arch: typing.Literal["modernbert", "bert"] = "modernbert"
    tiny_hidden: int = 128  # width of the tiny encoder
    tiny_layers: int = 2  # depth of the tiny encoder
    tiny_heads: int = 2  # attention heads of the tiny encoder
    tiny_vocab: int = 8000  # WordPiece vocabulary trained on the training texts
    dropout: float = 0.1  # dropout of the task heads
    shared_encoder: bool = True  # joint: one encoder for both heads (False = two encoders)
    # what the classification head reads: max over the tokens (a post shows a symptom if any sentence does) or [CLS]
    pooling: typing.Literal["max", "cls"] = "max"
    criterion_heads: bool = True  # one head output per criterion, picked by the pair's criterion (False = one for all)
    # post-level tasks: "pair" reads (criterion text, post) once per criterion; "post" reads each post window once
    # and takes all nine criteria's outputs from it (the per-criterion heads tell them apart)
    encoding: typing.Literal["pair", "post"] = "post"
    # evidence: "span" = start/end logits per token (SQuAD), a sentence scored by its best span; "tag" = one logit
    # per token, "inside an evidence sentence" (BCE), a sentence scored by the mean over its tokens
    evidence_head: typing.Literal["span", "tag"] = "tag"
    max_length: int = 256  # tokens per (criterion, text) window
    doc_stride: int = 64  # overlap between consecutive windows of a long post
    max_answer_tokens: int = 96  # longest span the decoder may return
    n_best: int = 5  # span candidates kept per window
    gradient_checkpointing: bool = False  # trade compute for memory
    trust_remote_code: bool = False  # only for hub models that need it
    # --- optimisation
    epochs: int | typing.Literal["auto"] = "auto"  # auto: tiny 4 (8 under post encoding), pretrained 3 (AUTO_DEFAULTS)
    max_steps: int = -1  # > 0 caps the number of optimizer steps
    batch_size: int = 32  # per process
    eval_batch_size: int = 64  # per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | typing.Literal["auto"] = "auto"  # auto: 2e-3 for tiny (from scratch), 5e-5 fine-tuning a pretrained one
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    scheduler: typing.Literal["cosine", "linear", "constant"] = "linear"
    warmup_ratio: float = 0.06  # fraction of optimizer steps spent warming up
    max_grad_norm: float = 1.0  # gradient clipping on sync steps; 0 disables
    class_weights: bool = False  # criteria: weight CE by inverse class frequency
    loss_weight_criteria: float = 1.0  # joint: w_c
    loss_weight_evidence: float = 1.0  # joint: w_e
    mixed_precision: typing.Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto = what `accelerate launch` says
    # --- early stopping and checkpoints
    early_stopping_metric: str = "auto"  # validation metric to watch; auto = the task's main metric
    early_stopping_mode: typing.Literal["max", "min"] = "max"
    patience: int = 3  # epochs without improvement before stopping; 0 disables
    min_delta: float = 1e-4  # smallest change that counts as an improvement
    resume: bool = False  # continue the run in output_dir from checkpoints/last
    save_every: int = 0  # also write checkpoints/last every N optimizer steps (0 = once per epoch)
    keep_checkpoints: int = 1  # training states kept: the newest is checkpoints/last, older ones checkpoints/step-N
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf (costs a host sync per step) instead of stopping
    # --- runtime
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms: exact repeats, slower
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels (GPU only)
    cudnn_attention: bool = False  # cuDNN's fused attention (GPU): it plans anew for every new batch shape
    # TF32 matmuls on Ampere and later GPUs (torch.set_float32_matmul_precision("high")): PyTorch leaves them off
    tf32: bool = True
    num_workers: int = 0  # DataLoader workers; features are pre-tokenised, so 0 is fastest on CPU
    threads: int = 0  # torch CPU threads per process; 0 = the machine's cores shared among its processes
    output_dir: str = "outputs/run"
    log_every: int = 10  # steps between progress/MLflow loss points
    # --- tracking
    mlflow: bool = True
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "redsm5"
    run_name: str | None = None
    mlflow_system_metrics: bool = False  # CPU, memory, disk (and GPU with pynvml) every 10 s; needs psutil
    mlflow_log_model: bool = False  # also copy checkpoints/best into the run's artifacts (model/); never uploaded


# What `auto` means, per field. The tiny encoder learns from scratch and takes a large rate (2e-3: the README's
# model table on the demo). A pretrained encoder is only fine-tuned, and 2e-3 wrecks its weights (issue 13, on an
# independent templated corpus: MiniLM at 2e-3 collapses to the majority class, f1_macro 0.443; at 5e-5, 1.000).
# 5e-5 and 3 epochs: the top rate and the middle epoch count of BERT's fine-tuning grid ({2, 3, 5}e-5, {2, 3, 4}).
# tiny_post: tiny under --encoding post on a post-level task. An epoch then has a ninth of pair encoding's optimizer
# steps (a window carries all nine criteria), and at 4 epochs joint is under-trained (README: test combined 0.687
# at 4 epochs, 0.762 at 8, pair encoding 0.617 at 4).
AUTO_DEFAULTS = {"lr": {"tiny": 2e-3, "tiny_post": 2e-3, "pretrained": 5e-5},
                 "epochs": {"tiny": 4, "tiny_post": 8, "pretrained": 3}}


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _choices(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def coerce(name: str, value, source: str):
    """Check `value` against the type of field `name`; strings from the command line are parsed."""
    fields = config_fields()
    if name not in fields:
        raise UserError(f"{source}: unknown config key '{name}' (valid: {', '.join(fields)})")
    tp = typing.get_type_hints(Config)[name]
    choices, optional = _choices(tp), type(None) in typing.get_args(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if choices:
        if value not in choices:
            raise UserError(f"{source}: invalid value {value!r} for '{name}' (choose from {', '.join(choices)})")
        return value
    words = [w for arg in typing.get_args(tp) for w in (_choices(arg) or ())]  # "auto" beside a number
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    base = next(t for t in (bool, int, float, str) if t is tp or t in typing.get_args(tp))
    try:
        if base is bool:
            if isinstance(value, str):
                value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        if base in (int, float) and isinstance(value, str):
            value = float(value) if base is float else int(value)
        if base is str and not isinstance(value, str):
            raise ValueError
        return base(value)
    except (ValueError, KeyError, TypeError):
        forms = " or ".join([base.__name__, *words])
        raise UserError(f"{source}: invalid value {value!r} for '{name}' (expected {forms})") from None


def read_yaml(path: str | Path, what: str = "config"):
    """safe_load a YAML file; a missing file or bad YAML is a one-line UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (UTF-8) {what} file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_yaml_config(path: str | Path) -> dict:
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    return {k: coerce(k, v, str(path)) for k, v in raw.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        if message.startswith("unrecognized arguments"):  # name the valid flags, or the likely one
            import difflib

            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            unknown = [w.split("=")[0] for w in message.split()[2:] if w.startswith("--")]
            close = sorted({m for w in unknown for m in difflib.get_close_matches(w, flags, n=3)})
            message += f" (did you mean {' or '.join(close)}?)" if close else f" (valid: {', '.join(flags)})"
        raise UserError(f"{self.prog}: {message}")


def parse_config(argv: list[str] | None = None, prog: str = "train.py",
                 extra=None) -> tuple[Config, argparse.Namespace]:
    """Config from defaults < --config YAML < --field flags. `extra(parser)` adds script-only flags."""
    parser = _Parser(prog=prog, allow_abbrev=False, description=__doc__)
    parser.add_argument("--config", help="YAML file of config fields")
    hints = typing.get_type_hints(Config)
    for name, f in config_fields().items():
        # a bare boolean flag means true, as users expect of store_true flags: `--resume` = `--resume true`
        bare = {"nargs": "?", "const": "true"} if hints[name] is bool else {}
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                            help=f"default: {f.default}", **bare)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    values = load_yaml_config(args.config) if args.config else {}
    for name in config_fields():
        if hasattr(args, name):
            values[name] = coerce(name, getattr(args, name), f"--{name}")
    return make_config(**values), args


def make_config(**overrides) -> Config:
    """A Config from field values, type-checked, `auto` resolved, then checked as a whole: every range and
    consistency rule is here."""
    cfg = resolve_auto(Config(**{k: coerce(k, v, "config") for k, v in overrides.items()}))
    validate_config(cfg)
    return cfg


def post_encoding(cfg: Config) -> bool:
    """`--encoding post` applies to the post-level examples; criteria of single sentences always reads pairs."""
    return cfg.encoding == "post" and not (cfg.task == "criteria" and cfg.unit == "sentence")


def resolve_auto(cfg: Config) -> Config:
    """`auto` fields replaced by the number for this model (AUTO_DEFAULTS), once, here: config.yaml, MLflow params
    and HPO's best_config.yaml then carry the number, and a rerun from config.yaml is the same run."""
    kind = ("tiny_post" if post_encoding(cfg) else "tiny") if cfg.model == "tiny" else "pretrained"
    chosen = {name: values[kind] for name, values in AUTO_DEFAULTS.items() if getattr(cfg, name) == "auto"}
    return dataclasses.replace(cfg, **chosen) if chosen else cfg


def validate_config(cfg: Config) -> None:
    floats = [f.name for f in dataclasses.fields(Config) if isinstance(getattr(cfg, f.name), float)]
    for name in floats:  # nan passes every comparison below, so it is refused first
        if not np.isfinite(getattr(cfg, name)):
            raise UserError(f"--{name}: must be a finite number, got {getattr(cfg, name)}")
    for name in ("val_ratio", "test_ratio", "warmup_ratio", "dropout", "fuzzy_threshold"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name}: must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.val_ratio + cfg.test_ratio >= 1:
        raise UserError(f"--val_ratio + --test_ratio: must leave posts to train on, got "
                        f"{cfg.val_ratio} + {cfg.test_ratio} >= 1")
    for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "n_best", "max_answer_tokens", "epochs",
                 "log_every", "keep_checkpoints", "tiny_hidden", "tiny_layers", "tiny_heads", "tiny_vocab",
                 "demo_posts"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
    for name in ("doc_stride", "threads", "num_workers", "save_every", "patience"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.doc_stride >= cfg.max_length // 2:
        raise UserError(f"--doc_stride: must be below max_length/2 ({cfg.max_length // 2}), got {cfg.doc_stride}")
    if cfg.tiny_hidden % cfg.tiny_heads:
        raise UserError(f"--tiny_heads: must divide --tiny_hidden {cfg.tiny_hidden}, got {cfg.tiny_heads}")
    if cfg.lr <= 0:
        raise UserError(f"--lr: must be > 0, got {cfg.lr}")
    if post_encoding(cfg) and not cfg.criterion_heads:
        raise UserError("--encoding post: needs --criterion_heads true (a window is read once for all nine criteria, "
                        "and only the per-criterion head outputs tell them apart)")
    if not cfg.output_dir.strip():
        raise UserError("--output_dir: must not be empty (it would write into the working directory)")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise UserError(f"--output_dir {cfg.output_dir}: is a file, not a folder")
    if cfg.mlflow and cfg.mlflow_system_metrics and importlib.util.find_spec("psutil") is None:
        raise UserError("--mlflow_system_metrics: needs psutil (pip install psutil, or the 'system-metrics' extra: "
                        "pip install -e '.[system-metrics]'); or run without it")
    if cfg.model != "tiny" and Path(cfg.model).is_dir() and not (Path(cfg.model) / "config.json").is_file():
        raise UserError(f"--model {cfg.model}: a folder without config.json (not a save_pretrained model folder)")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def set_seed(seed: int, deterministic: bool = False, cudnn_benchmark: bool = False) -> None:
    """Seed every generator; `deterministic` also forbids non-deterministic kernels."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def system_info() -> dict:
    """What the run ran on: logged with every run so numbers can be compared honestly."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
            cuda_version=torch.version.cuda,
        )
    return info


def make_accelerator(cfg: Config | None = None):
    """An Accelerator for this machine. Without CUDA it is told `cpu=True`: otherwise
    `accelerate launch --multi_gpu --num_processes 2` on a CPU box starts two independent
    single-process runs instead of one gloo group."""
    from accelerate import Accelerator

    kwargs = {"cpu": not torch.cuda.is_available()}
    if cfg is not None:
        kwargs.update(gradient_accumulation_steps=cfg.grad_accum,
                      mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision)
    accelerator = Accelerator(**kwargs)
    if accelerator.device.type == "cuda":
        use_cudnn_attention(cfg.cudnn_attention if cfg is not None else False)
        torch.set_float32_matmul_precision("high" if cfg is None or cfg.tf32 else "highest")
    if cfg is not None and accelerator.device.type == "cpu":
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1: one core of many. By default share
        # the cores among this machine's processes instead, never more threads than cores.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(cfg.threads or max(1, cores // local))
    return accelerator


def use_cudnn_attention(enabled: bool) -> None:
    """PyTorch's SDPA may pick cuDNN's fused attention for bf16/fp16 with a mask. cuDNN builds a plan
    for every new input shape, and length-grouped batches bring a new shape most steps: off, SDPA
    takes the memory-efficient kernel, which needs no plan (README: GPU figures)."""
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def dataloader_kwargs(cfg: Config, use_cuda: bool) -> dict:
    kwargs = {"num_workers": cfg.num_workers, "pin_memory": use_cuda}
    if cfg.num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return kwargs


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # accelerate logs every file of every save_state at INFO ("Sampler state for dataloader 1 saved in ...")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main, argv=None) -> None:
    """Entry-point wrapper: user errors are one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        # a line from a binary or UTF-16 file must not put NULs and control bytes on the terminal
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the environment, not our code: a read-only folder, a full disk
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


# --- folders that must never be torn: written whole under a temp name, then swapped in

COMPLETE = "COMPLETE"  # marker file, written last into a folder before it is swapped in


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def recover_dir(dst: Path) -> None:
    """After a kill inside replace_dir: put the complete copy back at dst and remove the leftovers."""
    old = dst.with_name(dst.name + ".old")
    if not dst.exists() and is_complete(old):  # killed between the two renames
        old.rename(dst)
    if old.exists():  # killed inside the removal of the old copy
        shutil.rmtree(old)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Swap the fully written folder tmp in at dst. A kill at any instant leaves a complete copy at dst or
    at dst.old (find_complete_dir finds it; the next replace_dir cleans up)."""
    (tmp / COMPLETE).touch()
    recover_dir(dst)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def find_complete_dir(dst: Path) -> Path | None:
    """Read-only: dst if complete, else dst.old if complete (a kill between the renames), else None."""
    dst = Path(dst)
    for path in (dst, dst.with_name(dst.name + ".old")):
        if is_complete(path):
            return path
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """One file, never half written: a temp file beside it, then os.replace. The temp name holds the PID:
    several HPO workers rewrite the same files at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def output_dir_lock(out_dir: Path, is_main: bool):
    """One run per output_dir: a second run (or a resume while the first one's workers still train) meets this
    flock and stops naming the holder's PID. The kernel releases the lock of a process that died."""
    if not is_main:  # the main process holds it for all of a run's processes
        yield
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise UserError(f"--output_dir {out_dir}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UserError(f"--output_dir {out_dir}: another run is using it (pid {holder}); wait for it, stop it, "
                        "or give another --output_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


# --- MLflow (imported lazily: `import mlflow` costs seconds)

def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def start_system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's own sampler of CPU, memory, disk, network (and GPU where pynvml is installed): a thread that logs
    `system/...` metrics every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) until the run ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


class Tracker:
    """One MLflow run, written on the main process only; a no-op when tracking is off.

    Step metrics are buffered and sent in batches: one sqlite write per step would cost more
    than the tiny model's training step.
    """

    def __init__(self, cfg: Config, enabled: bool, run_id: str | None = None, parent_run_id=None):
        self.enabled, self.buffer, self.run_id, self.ended = enabled and cfg.mlflow, [], None, False
        self.monitor, resumed = None, run_id is not None
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import ("Creating tables...")
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        mlflow.set_tracking_uri(uri)
        try:
            self.client = MlflowClient(uri)
            self.client.search_experiments(max_results=1)  # a bad URI or unreachable store fails here, not mid-run
        except Exception as e:  # mlflow raises its own exception types, several per store kind
            reason = str(e).strip().splitlines()[0][:200]
            raise UserError(f"--tracking_uri {uri}: cannot open the MLflow store ({reason}); "
                            "or run with --mlflow false") from None
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
            tags = {"mlflow.runName": cfg.run_name or f"{cfg.task}-{Path(cfg.output_dir).name}",
                    "mlflow.note.content": f"`{shlex.join(sys.argv)}`",  # the run's description: its command
                    "mlflow.source.name": Path(sys.argv[0]).name, "mlflow.source.type": "LOCAL"}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(exp_id, tags=tags).info.run_id
            params = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
            self._log_params(run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if cfg.mlflow_system_metrics:
            self.monitor = start_system_metrics(run_id, uri, resumed)

    def _log_params(self, run_id, params: dict):
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_params(self, params: dict):
        if self.enabled:
            self._log_params(self.run_id, {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int, flush: bool = False):
        if not self.enabled:
            return
        import time

        ts = int(time.time() * 1000)
        self.buffer += [(k, float(v), ts, step) for k, v in flatten(metrics).items()]
        if flush or len(self.buffer) >= 200:
            self.flush()

    def flush(self):
        if self.enabled and self.buffer:
            from mlflow.entities import Metric

            for i in range(0, len(self.buffer), 500):
                chunk = [Metric(k, v, ts, s) for k, v, ts, s in self.buffer[i : i + 500]]
                self.client.log_batch(self.run_id, metrics=chunk)
            self.buffer = []

    def log_artifact(self, path: str | Path):
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path))

    def log_artifacts(self, folder: str | Path, artifact_path: str):
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dict(self, d: dict, name: str):
        if self.enabled:
            self.client.log_text(self.run_id, json.dumps(d, indent=2, default=str), name)

    def log_table(self, columns: dict[str, list], name: str):
        """A table artifact (name.json) that the run's Artifacts tab shows as a table."""
        if self.enabled:
            self.client.log_table(self.run_id, data=columns, artifact_file=name)

    def log_dataset(self, name: str, digest: str, source_type: str, source: dict, profile: dict,
                    tags: dict | None = None, context: str = "training"):
        """A dataset input of the run (the UI's Datasets panel): what the data is, where it came from and a
        content digest, so runs on different data can be told apart. Only this description is stored."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps(source),
                          profile=json.dumps(profile))
        input_tags = [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, input_tags + [InputTag("mlflow.data.context",
                                                                                          context)])])

    def end(self, status: str = "FINISHED"):
        """End the run once; later calls do nothing."""
        if self.enabled and not self.ended:
            self.ended = True
            self.flush()
            if self.monitor is not None:
                self.monitor.finish()  # its last samples, while the run is still RUNNING
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """A run left by an exception ends KILLED (Ctrl-C, kill) or FAILED, not RUNNING for ever."""
        if exc_type is None:
            self.end()
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False
