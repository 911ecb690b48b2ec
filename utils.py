"""Process plumbing: one-line user errors and exit codes, signals, out of memory, logging, seeding, the accelerator,
YAML and strict JSON. Files that are never torn are files.py's.

Imports nothing else of ours. torch is imported inside the functions that need it, so that `import metrics`
(numpy and scikit-learn only) stays free of it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger("redsm5")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends), raised where the process is, so that it unwinds as Ctrl-C does: the
    lock released, the MLflow run ended KILLED, checkpoints/last left as it was saved."""


class _SigtermAtStepBoundary:
    """While the training loop holds it (`with STEP_BOUNDARY:`), SIGTERM only sets `asked`: the loop reads it after each
    optimizer step, saves checkpoints/last there and raises Terminated itself, so that a resume loses no step and no
    save holds half-applied gradients. Anywhere else SIGTERM raises at once (nothing unsaved to lose)."""

    def __init__(self):
        self.active, self.asked = False, False

    def __enter__(self):
        self.active, self.asked = True, False
        return self

    def __exit__(self, kind, value, traceback):
        self.active = False
        if kind is None and self.asked:  # it came after the loop's last look, everything saved: stop here
            raise Terminated()
        return False


STEP_BOUNDARY = _SigtermAtStepBoundary()


def _raise_terminated(signum, frame):
    if STEP_BOUNDARY.active:
        STEP_BOUNDARY.asked = True
        return
    # The run unwinds from wherever the signal lands; inside an MLflow store's database call, SQLAlchemy's pool then
    # logs the interrupted connection's reset as an ERROR with a traceback. The run is ending: the line run_main
    # prints says so, and the store ends the run KILLED.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    raise Terminated()


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never a traceback."""


def first_line(e: BaseException) -> str:
    """An exception as one line of an error message: its first line, at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def run_main(main, argv=None) -> None:
    """Entry-point wrapper: user errors are one line on stderr and exit code 2; Ctrl-C (130) and SIGTERM (143) one
    line too, after the run has unwound (no traceback)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except KeyboardInterrupt as e:
        code, how = (143, "stopped by SIGTERM") if isinstance(e, Terminated) else (130, "interrupted")
        if code == 143 and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun stops every process when one fails
            how += (" (from the launcher, which stops every process of a run when one of them fails: its error, or an "
                    "exitcode -9 for a process killed, often for memory, is in the launcher's lines)")
        note = getattr(e, "note", None)  # what the entry point can say of it (train.py: how to resume, if it can)
        print(f"error: {how}" + (f"; {note}" if note else ""), file=sys.stderr)
        sys.exit(code)
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
    finally:
        signal.signal(signal.SIGTERM, previous)


def out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the "out of memory" RuntimeError of other backends (accelerate's own test)."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e)


@contextlib.contextmanager
def out_of_memory_as_error(what: str, remedy: str):
    """The device out of memory inside the block: one line naming what ran out and what to change, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise UserError(f"out of memory {what} ({first_line(e)[:120]}): {remedy}") from None


def retry(call, retryable, tries: int, wait_s, what: str | None = None):
    """call(), again while `retryable(error)` says the error is a race between processes that start together (a
    fresh store's schema being created by another), at most `tries` times; the last error is raised. `wait_s(n)`:
    the seconds before retry n + 1; `what`: a warning line naming it at each retry."""
    for attempt in range(tries):
        try:
            return call()
        except Exception as e:  # mlflow, sqlalchemy and alembic raise their own types
            if not retryable(e) or attempt == tries - 1:
                raise
            if what:
                log.warning("%s not ready (%s): retrying in %g s", what, first_line(e)[:150], wait_s(attempt))
            time.sleep(wait_s(attempt))


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # accelerate logs every file of every save_state at INFO ("Sampler state for dataloader 1 saved in ...")
    for noisy in ("alembic", "mlflow", "httpx", "accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # urllib3 warns at every retry of a request to a tracking server that went away; tracking.py says it once
    logging.getLogger("urllib3").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- seeds and hardware


def set_seed(seed: int, deterministic: bool = False, cudnn_benchmark: bool = False) -> None:
    """Seed every generator; `deterministic` also forbids non-deterministic kernels."""
    import torch

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
    import torch

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


def cpu_threads(threads: int, processes: int) -> int:
    """torch's CPU threads per process: --threads when given; else OMP_NUM_THREADS when the user set it (a shared
    server's convention); else this machine's cores shared among its processes, never more threads than cores.
    Under `accelerate launch` OMP_NUM_THREADS is the launcher's (1 when not told --cpu: one core of many), so
    there the cores are shared; --threads sets it."""
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # accelerate launch sets it, and OMP_NUM_THREADS with it
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if threads:
        return threads
    if omp.isdigit() and int(omp) > 0 and not launched:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", processes)))


def code_version() -> str:
    """The commit of this code: `<sha>`, `<sha>+local changes` when tracked files differ from it, or `not a git
    checkout` (a copy without .git, or no git on the machine). Recorded in run.json, run_stats.json and MLflow."""
    import subprocess

    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"{sha}+local changes" if dirty else sha


def make_accelerator(cfg=None):
    """An Accelerator for this machine. Without CUDA it is told `cpu=True`: otherwise
    `accelerate launch --multi_gpu --num_processes 2` on a CPU box starts two independent
    single-process runs instead of one gloo group."""
    import torch
    from accelerate import Accelerator

    kwargs = {"cpu": not torch.cuda.is_available()}
    if cfg is not None:
        kwargs.update(gradient_accumulation_steps=cfg.grad_accum,
                      mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision,
                      dynamo_backend=None if cfg.dynamo_backend == "auto" else cfg.dynamo_backend)
    accelerator = Accelerator(**kwargs)
    if accelerator.device.type == "cuda":
        use_cudnn_attention(cfg.cudnn_attention if cfg is not None else False)
        torch.set_float32_matmul_precision("high" if cfg is None or cfg.tf32 else "highest")
    if cfg is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, accelerator.num_processes))
    return accelerator


def use_cudnn_attention(enabled: bool) -> None:
    """PyTorch's SDPA may pick cuDNN's fused attention for bf16/fp16 with a mask. cuDNN builds a plan
    for every new input shape, and length-grouped batches bring a new shape most steps: off, SDPA
    takes the memory-efficient kernel, which needs no plan (README: GPU figures)."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(enabled)


def dataloader_kwargs(cfg, use_cuda: bool) -> dict:
    kwargs = {"num_workers": cfg.num_workers, "pin_memory": use_cuda}
    if cfg.num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=leave_stop_signals_to_the_main)
    return kwargs


def leave_stop_signals_to_the_main(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGINT: `scancel`, `timeout` and Ctrl-C signal the whole process
    group, and a worker killed by it made the main process raise "DataLoader worker is killed by signal" (a
    traceback, exit 1) instead of ending the run as run_main does (one line, 143 / 130). The main process stops its
    workers as it unwinds; a worker whose main process died exits by itself (PyTorch's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_lost_main


def _quiet_lost_main(kind, value, traceback) -> None:
    """A worker's sys.excepthook: the main process, stopped, drops the connection on which it was fetching a batch's
    tensors (multiprocessing's resource sharer hands their file descriptors over in a thread of the worker, and
    reports the lost connection here); the rest is reported as usual."""
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, value, traceback)


# --------------------------------------------------------------------------- files: read checked, written whole


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
    except RecursionError:  # PyYAML composes nested lists recursively: thousands of `[` exhaust the stack
        raise UserError(f"{path}: nested too deeply to read (thousands of levels): not a {what} file") from None


def json_safe(obj):
    """`obj` with every non-finite float (NaN, inf) replaced by None, recursively, and numpy scalars and
    arrays made plain: json.dumps(json_safe(x), allow_nan=False) is then strict JSON (NaN is not JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON: NaN and inf are written as null."""
    return json.dumps(json_safe(obj), allow_nan=False, default=float, **kwargs)
