"""Optuna storage for HPO studies: URLs (sqlite, PostgreSQL, journal files), retries at start, the study's record in
its folder, trials of dead and of paused workers.

An RDB storage (sqlite, PostgreSQL, MySQL) records a heartbeat of every running trial every HEARTBEAT_S
seconds: a trial whose heartbeat is GRACE_S old is marked failed and queued once more with the same
parameters. A journal file (journal:PATH) has no heartbeat; for both, recover_dead_trials finds at once
the RUNNING trials of processes of this host that are gone (by the worker_host and worker_pid user
attributes hpo.py's trials set) and marks them dead_worker. A worker paused past the grace period wakes
to find its trial finished by another worker (finished_elsewhere): what it still writes to it is dropped.
A study's folder holds one study: study.json records its storage (check_study_dir).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import warnings
from pathlib import Path

import optuna

from utils import UserError, retry

log = logging.getLogger("redsm5")
DEFAULT_STORAGE = "sqlite:///outputs/hpo/optuna.db"
HEARTBEAT_S, GRACE_S = 10, 30
STUDY_FILE = "study.json"  # in a study's folder: which study (storage, name) writes there


def redact(url: str) -> str:
    """The storage URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def make_storage(url: str):
    """The Optuna storage of --storage; a URL that cannot be opened is a UserError naming --storage."""
    import sqlalchemy.exc

    try:
        return _make_storage(url)
    except (ImportError, OSError, ValueError, sqlalchemy.exc.SQLAlchemyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, ImportError):  # name the driver that is missing: SQLAlchemy picks it from the URL's scheme
            driver = missing_module(e)
            if driver is None:
                msg = "its database driver is not installed: install the driver of the URL's database"
            else:
                msg = f"the database driver {driver} is not installed: " + \
                      DRIVER_PACKAGES.get(driver, f"pip install {driver}")
        raise UserError(f"--storage {redact(url)}: cannot open it ({redact(msg)[:300]}; expected sqlite:///PATH, "
                        "postgresql://user:password@host/db, mysql://..., or journal:PATH)") from None


# the pip command of the drivers SQLAlchemy imports for a URL's scheme (their module names are not their package names)
DRIVER_PACKAGES = {"psycopg": "pip install -e '.[postgres]'", "psycopg2": "pip install psycopg2-binary",
                   "MySQLdb": "pip install mysqlclient", "pymysql": "pip install pymysql"}


def missing_module(e: BaseException) -> str | None:
    """The module an import error is about: Optuna re-raises SQLAlchemy's ModuleNotFoundError as an ImportError of its
    own ("Failed to import DB access module"), without the name, which is on the error it came from."""
    while e is not None:
        if isinstance(e, ImportError) and e.name:
            return e.name
        e = e.__cause__ or e.__context__
    return None


def _make_storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for another worker's write, not "database is locked"
    with warnings.catch_warnings():  # heartbeat and retry are "experimental" since Optuna 2.9: stable enough
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return retry_at_start(lambda: optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)),
            "optuna storage")


def _last_line_start(fh, size: int) -> int:
    """Where the last line of a file of `size` bytes starts (the byte after the newline before it, or 0)."""
    end, block = size - 1, 1 << 16  # the newline that ends the last line (if any) is not its start
    while end > 0:
        fh.seek(max(0, end - block))
        chunk = fh.read(end - max(0, end - block))
        at = chunk.rfind(b"\n")
        if at >= 0:
            return max(0, end - block) + at + 1
        end = max(0, end - block)
    return 0


def repair_journal(path: Path) -> int:
    """Drop a partial last record of a journal file (no newline at its end, or not JSON: a worker killed while
    appending, or a full disk) before Optuna opens it: Optuna would append the next record to that partial line
    and fail on it at every later start. The file is rewritten whole without it (the old one kept as PATH.bak),
    under the journal's own lock, so no worker appends meanwhile; one warning says what was dropped. Returns the
    number of bytes dropped."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return 0
    lock = JournalFileSymlinkLock(str(path))  # the lock JournalFileBackend takes to append
    lock.acquire()
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            start = _last_line_start(fh, size)
            fh.seek(start)
            last = fh.read()
            try:
                whole = last.endswith(b"\n") and isinstance(json.loads(last), dict)
            except ValueError:  # UnicodeDecodeError included
                whole = False
            if whole:
                return 0
            fh.seek(0)
            kept = fh.read(start)
        backup, tmp = path.with_name(path.name + ".bak"), path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, backup)
        tmp.write_bytes(kept)
        os.replace(tmp, path)
    finally:
        lock.release()
    shown = last[:60].decode("utf-8", errors="replace").replace("\n", " ").replace("\x00", "\\0")
    log.warning("journal:%s: its last record was partial (%d bytes, %s: a worker killed while writing it, or a "
                "full disk) and is dropped: %r...; the file as it was is in %s", path, len(last),
                "not JSON" if last.endswith(b"\n") else "no newline at its end", shown, backup)
    return len(last)


def retry_at_start(make, what: str, more_errors: tuple = ()):
    """Workers started together race to create a fresh database (tables, schema migrations): the losers retry."""
    import sqlalchemy.exc

    errors = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, *more_errors)
    return retry(make, lambda e: isinstance(e, errors), tries=6, wait_s=lambda n: 5, what=what)


def storage_identity(url: str) -> str:
    """The storage as a study's folder records it: no password, file paths made absolute (a relative path and an
    absolute one to the same file are one storage)."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix) and url[len(prefix):] not in ("", ":memory:"):
            path, query = url[len(prefix):].partition("?")[::2]
            return prefix + str(Path(path).resolve()) + (f"?{query}" if query else "")
    return redact(url)


def check_study_dir(study_dir: Path, storage: str, name: str, claim: bool = False) -> None:
    """One study per folder. The first worker of a study records it (storage, name) in study_dir/study.json; a
    study of another storage or name that targets the folder is refused, naming the folder and the other storage
    (its trials would overwrite trial_<n>/, best_config.yaml and trials_history.json). With `claim`, the record is
    written when there is none: whole, and never over another worker's (a hard link fails if the name exists)."""
    me, path = {"storage": storage_identity(storage), "study_name": name}, study_dir / STUDY_FILE
    if claim and not path.exists():
        study_dir.mkdir(parents=True, exist_ok=True)
        tmp = study_dir / f".{STUDY_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(me, indent=2) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:  # a worker started at the same moment recorded its study first: compare below
            pass
        finally:
            tmp.unlink()
    if not path.exists():
        return
    try:
        other = json.loads(path.read_text())
        other = {k: other[k] for k in me}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a study record (expected JSON with storage and study_name): remove it if the "
                        "folder holds no other study") from None
    if other != me:
        raise UserError(f"{study_dir}: holds study '{other['study_name']}' of storage {other['storage']}, not "
                        f"'{name}' of {me['storage']}: one study per folder (its trials would overwrite the other's); "
                        "give another --output_dir or --study_name")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_dead_trials(study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker was a process of this host that no longer exists, and queue
    each once more with the same parameters; returns their numbers. The heartbeat finds such a trial only
    after GRACE_S (and a journal storage has none): a command rerun at once would otherwise leave it RUNNING
    for good. A recovered trial does not count toward --n_trials (its retry does)."""
    host, recovered = socket.gethostname(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    for t in study.get_trials(deepcopy=True, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("worker_pid")
        if t.user_attrs.get("worker_host") != host or not isinstance(pid, int) or pid_alive(pid):
            continue
        try:  # a finished trial takes no attributes: they first
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                               f"worker died: process {pid} on {host} is gone (found at a restart)")
            study._storage.set_trial_user_attr(t._trial_id, "dead_worker", True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker started at the same moment got there first
            continue
        retry(study, t)  # t: the trial as it was (no dead_worker attr to copy); a retry of a retry is not retried
        log.warning("trial %d: its worker (pid %d on %s) is gone: marked failed and queued again", t.number, pid, host)
        recovered.append(t.number)
    return recovered


def finished_elsewhere(e: BaseException) -> bool:
    """Whether `e` says the trial was finished by someone else: a worker paused (SIGSTOP, a suspended laptop) past
    the heartbeat's grace period wakes to find its trial marked failed, and rerun, by another worker."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError)


def note(trial, key: str, value, lost: list | None = None) -> None:
    """trial.set_user_attr, except on a trial finished elsewhere: then its number is put in `lost`, nothing raised."""
    try:
        trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        if lost is not None and trial.number not in lost:
            lost.append(trial.number)


def newly_lost(e: BaseException, lost: list, handled: set, started: list) -> list[int]:
    """The trials that `e`, an error out of study.optimize, says another worker finished meanwhile and that were not
    handled yet: those the objective put in `lost`, else, on Optuna's own tell of a trial another worker finished (a
    ValueError), the last trial started (paused after the objective returned, before Optuna's tell). Empty: `e` is
    another error."""
    new = [n for n in lost if n not in handled]
    if not new and isinstance(e, ValueError) and str(e).startswith("Cannot tell a") and started \
            and started[-1] not in handled:
        new = [started[-1]]
    return new


class QuietLostTrials(logging.Filter):
    """Drops Optuna's log lines about trials another worker finished (`lost`): run_trials says it in one line."""

    def __init__(self, lost: list):
        super().__init__()
        self.lost = lost

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} ") for n in self.lost)
