"""Files that are never torn: a file written whole (a temp file beside it, then os.replace), a folder written whole
under a temp name and swapped in, with its COMPLETE marker and the recovery after a kill between the renames, and
the one-run-per-output_dir lock. A failed write (a full disk) is one line naming the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from utils import UserError, dumps, first_line


def write_jsonl(rows, path) -> int:
    """JSON lines, written whole or not at all (a temp file beside it, then os.replace): a file that a later step
    reads back is never torn. `rows` may be a generator (rows made as they are written); returns their number."""
    path, n = Path(path), 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            for r in rows:
                fh.write(dumps(r) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def check_writable(path: str | Path, flag: str = "--output") -> Path:
    """Refuse an output path that cannot be written before any work is done: its folder must exist and be
    writable, and the path must not be a folder."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory (give a file name)")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """One file, never half written: a temp file beside it, then os.replace. The temp name holds the PID:
    several HPO workers rewrite the same files at once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:  # a full disk: no stray temp file
        tmp.unlink(missing_ok=True)


# folders that must never be torn: written whole under a temp name, then swapped in


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
    at dst.old (find_complete_dir finds it; the next replace_dir cleans up). Every file in it gets the mode a new
    file gets here (the COMPLETE marker's: 0644 under umask 022): safetensors writes its weights 0600 through a temp
    file, which others on shared storage could not read."""
    (tmp / COMPLETE).touch()
    mode = (tmp / COMPLETE).stat().st_mode & 0o777
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)
    recover_dir(dst)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, when `e` is a failed write (a full disk, a quota, a read-only folder), also as the writers
    wrap it: safetensors' SafetensorError ("I/O error: No space left on device"), torch.save's RuntimeError from its
    zip writer ("unexpected pos", nothing more). None for anything else: a bug keeps its traceback."""
    text = first_line(e)
    if isinstance(e, OSError):
        return e.strerror or text
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error: ", 1)[-1].split(" (os error")[0]
    if isinstance(e, RuntimeError) and "inline_container" in text:
        return f"torch.save could not write ({text[:80]}): most likely a full disk"
    return None


@contextlib.contextmanager
def folder_written_whole(dst: Path, is_main: bool = True):
    """The one way a folder that must never be torn is written: into dst.tmp (yielded, new and empty),
    swapped in at dst by replace_dir when the block ends. A failed write (a full disk) or a kill removes dst.tmp; a
    failed write is one line naming dst (exit code 2), and dst keeps its previous complete copy. `is_main`: the
    process that removes and swaps (every process may write into dst.tmp)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_main:
            tmp.mkdir(parents=True)
        yield tmp
    except BaseException as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(e)
        if why is None:
            raise
        kept = ", its previous complete copy is kept" if find_complete_dir(dst) is not None else ""
        raise UserError(f"{dst}: cannot be written ({why}); nothing half-written is left{kept}; free some space, then "
                        "resume (--resume true) or run again") from None
    if is_main:
        replace_dir(tmp, dst)


def find_complete_dir(dst: Path) -> Path | None:
    """Read-only: dst if complete, else dst.old if complete (a kill between the renames), else None."""
    dst = Path(dst)
    for path in (dst, dst.with_name(dst.name + ".old")):
        if is_complete(path):
            return path
    return None


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
