"""files.py's atomic folder swap: a kill at any instant of replace_dir leaves one complete copy, found and cleaned up; a
failed write leaves no temp folder; a swapped-in folder has the file modes of new files."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import utils
from files import COMPLETE, find_complete_dir, folder_written_whole, recover_dir, replace_dir, write_text_atomic
from utils import UserError


def make_folder(path: Path, contents: str, complete: bool = True) -> Path:
    path.mkdir()
    (path / "weights.txt").write_text(contents)
    if complete:
        (path / COMPLETE).touch()
    return path


def assert_only_dst_with(dst: Path, contents: str):
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]
    assert (dst / "weights.txt").read_text() == contents
    assert find_complete_dir(dst) == dst


@pytest.mark.parametrize("states", [
    {"dst": True, "old": False},  # dst complete, a partial old left by a kill inside rmtree(old)
    {"old": True},  # killed between the two renames: no dst, old complete
    {"old": True, "tmp": True},  # ... and the new tmp, also complete, never renamed in
])
def test_each_on_disk_state_of_a_kill_keeps_a_complete_copy(tmp_path, states):
    dst, old, tmp = tmp_path / "best", tmp_path / "best.old", tmp_path / "best.tmp"
    if "dst" in states:
        make_folder(dst, "v1")
    if "old" in states:
        make_folder(old, "v1" if states["old"] else "v0-partial", complete=states["old"])
    if "tmp" in states:
        make_folder(tmp, "v2-abandoned")
        shutil.rmtree(tmp)  # the caller rewrites its tmp from scratch before the next swap
    found = find_complete_dir(dst)
    assert found is not None and (found / "weights.txt").read_text() == "v1"
    make_folder(tmp, "v2", complete=False)
    replace_dir(tmp, dst)
    assert_only_dst_with(dst, "v2")


@pytest.mark.parametrize("fails, at_call", [("rename", 1), ("rename", 2), ("rmtree", 1)])
def test_a_kill_at_each_step_of_replace_dir_keeps_a_complete_copy(tmp_path, monkeypatch, fails, at_call):
    dst, tmp = tmp_path / "best", tmp_path / "best.tmp"
    make_folder(tmp, "v1", complete=False)
    replace_dir(tmp, dst)
    make_folder(tmp, "v2", complete=False)
    calls, real = [0], {"rename": Path.rename, "rmtree": shutil.rmtree}[fails]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt  # the kill
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        if fails == "rename":
            m.setattr(Path, "rename", dying)
        else:
            m.setattr(shutil, "rmtree", dying)
        with pytest.raises(KeyboardInterrupt):
            replace_dir(tmp, dst)
    found = find_complete_dir(dst)
    expected = "v2" if (fails, at_call) == ("rmtree", 1) else "v1"  # v2 is in once the second rename is done
    assert found is not None and (found / "weights.txt").read_text() == expected
    if tmp.exists():
        shutil.rmtree(tmp)
    make_folder(tmp, "v3", complete=False)
    replace_dir(tmp, dst)
    assert_only_dst_with(dst, "v3")


def test_recover_dir_on_a_clean_folder_changes_nothing(tmp_path):
    dst = make_folder(tmp_path / "best", "v1")
    recover_dir(dst)
    assert_only_dst_with(dst, "v1")
    assert find_complete_dir(tmp_path / "missing") is None


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_swapped_in_folder_has_the_modes_of_new_files(tmp_path, umask, mode):
    """safetensors writes its weights 0600 (through a temp file) while the other files were 0644: others on shared
    storage could not read a checkpoint's weights (issue 31). After the swap every file has a new file's mode."""
    import os

    previous = os.umask(umask)
    try:
        tmp = make_folder(tmp_path / "best.tmp", "v1", complete=False)
        (tmp / "encoder").mkdir()
        (tmp / "encoder" / "model.safetensors").write_bytes(b"w")
        for f in (tmp / "weights.txt", tmp / "encoder" / "model.safetensors"):
            f.chmod(0o600 if umask != 0o077 else 0o644)
        replace_dir(tmp, tmp_path / "best")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "best").rglob("*") if p.is_file()]
    assert len(files) == 3 and {p.stat().st_mode & 0o777 for p in files} == {mode}


@pytest.mark.parametrize("error, line", [
    (OSError(28, "No space left on device"), "cannot be written (No space left on device)"),
    ("safetensors", "cannot be written (No space left on device)"),  # what safetensors raises on a full disk
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # what torch.save raises
     "cannot be written (torch.save could not write"),
    (ValueError("a bug"), None),  # not a failed write: its own type, traceback and all
    (KeyboardInterrupt(), None),
])
def test_a_failed_folder_write_removes_its_temp_and_keeps_the_previous_copy(tmp_path, error, line):
    """A full disk while saving was a SafetensorError traceback and left checkpoints/last.tmp (issue 31)."""
    from safetensors import SafetensorError

    if error == "safetensors":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    dst = tmp_path / "last"
    with folder_written_whole(dst) as tmp:
        (tmp / "weights.txt").write_text("v1")
    with pytest.raises(UserError if line else type(error)) as e:
        with folder_written_whole(dst) as tmp:
            (tmp / "weights.txt").write_text("v2, half")
            raise error
    if line:
        assert str(e.value).startswith(f"{dst}: {line}") and "its previous complete copy is kept" in str(e.value)
    assert_only_dst_with(dst, "v1")  # no last.tmp


def test_write_text_atomic_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("env, threads, processes, expected", [
    ({"OMP_NUM_THREADS": "1"}, 0, 1, 1),  # a shared server's convention is kept
    ({"OMP_NUM_THREADS": "3"}, 2, 1, 2),  # --threads wins
    ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 0, 1, None),  # the launcher's 1: cores shared
    ({}, 0, 1, None),
])
def test_cpu_threads_follow_threads_then_omp_num_threads(monkeypatch, env, threads, processes, expected):
    import os

    import utils

    for key in ("OMP_NUM_THREADS", "ACCELERATE_DYNAMO_BACKEND", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cores = len(os.sched_getaffinity(0))
    assert utils.cpu_threads(threads, processes) == (cores if expected is None else expected)


def test_code_version_outside_a_checkout(tmp_path):
    import importlib.util

    shutil.copy(Path(__file__).resolve().parents[1] / "utils.py", tmp_path / "utils_copy.py")
    spec = importlib.util.spec_from_file_location("utils_copy", tmp_path / "utils_copy.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.code_version() == "not a git checkout"


def test_sigterm_quiets_the_database_pool_before_the_run_unwinds(monkeypatch):
    """A SIGTERM that lands inside an MLflow database call made SQLAlchemy's pool log the interrupted connection's
    reset with a traceback (seen once in the SIGTERM test under load): the handler quiets that logger first."""
    import logging

    pool = logging.getLogger("sqlalchemy.pool")
    monkeypatch.setattr(pool, "level", logging.NOTSET)
    with pytest.raises(utils.Terminated):
        utils._raise_terminated(15, None)
    assert pool.level == logging.CRITICAL
