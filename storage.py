"""Optuna storage for HPO studies: URLs (sqlite, PostgreSQL, journal files), retries at start, trials of dead workers.

An RDB storage (sqlite, PostgreSQL, MySQL) records a heartbeat of every running trial every HEARTBEAT_S
seconds: a trial whose heartbeat is GRACE_S old is marked failed and queued once more with the same
parameters. A journal file (journal:PATH) has no heartbeat; for both, recover_dead_trials finds at once
the RUNNING trials of processes of this host that are gone (by the worker_host and worker_pid user
attributes hpo.py's trials set) and marks them dead_worker.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path

import optuna

from utils import UserError

log = logging.getLogger("redsm5")
DEFAULT_STORAGE = "sqlite:///outputs/hpo/optuna.db"
HEARTBEAT_S, GRACE_S = 10, 30


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
        if isinstance(e, ImportError):
            msg += " (PostgreSQL needs psycopg2, MySQL pymysql)"
        raise UserError(f"--storage {redact(url)}: cannot open it ({redact(msg)[:300]}; expected sqlite:///PATH, "
                        "postgresql://user:password@host/db, mysql://..., or journal:PATH)") from None


def _make_storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        Path(url[len("journal:"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
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


def retry_at_start(make, what: str, more_errors: tuple = (), tries: int = 6):
    """Workers started together race to create a fresh database (tables, schema migrations): the losers retry."""
    import sqlalchemy.exc

    errors = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, *more_errors)
    for attempt in range(tries):
        try:
            return make()
        except errors as e:
            if attempt == tries - 1:
                raise
            log.warning("%s not ready (%s): retrying in 5 s", what, str(e).splitlines()[0][:150])
            time.sleep(5)


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
