"""LoRA adapters (Hu et al., 2021) on a pretrained encoder, through PEFT: `--lora true` freezes the encoder and trains
low-rank updates of its linear layers (lora_rank, lora_alpha, lora_dropout, lora_target_modules); the task heads,
which start from random, train in full.

The point is a small model per run (per fold, per seed): a checkpoint keeps what training changed. Its encoder/ folder
holds PEFT's adapter (adapter_config.json, adapter_model.safetensors) with the tokenizer, and the base encoder is the
one --model names in the checkpoint's config.yaml, loaded with from_pretrained as for training. The encoder is not
merged: a merged copy would be as large as full fine-tuning's (results/2026-12-06_lora-and-attention.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import torch

from config import Config
from utils import UserError, first_line

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


def lora_config(cfg: Config):
    from peft import LoraConfig

    targets = cfg.lora_target_modules.strip()
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])


def add_lora(model, cfg: Config):
    """`model`'s encoder(s) wrapped in fresh adapters (PeftModel), their own weights frozen; the heads stay trainable.
    Under gradient checkpointing the frozen embeddings' output is made to require grad, or the checkpointed layers
    would pass no gradient to their adapters."""
    from peft import get_peft_model

    for name in ("encoder", "span_encoder"):
        encoder = getattr(model, name)
        if encoder is None:
            continue
        config = lora_config(cfg)
        check_targets(encoder, config.target_modules, cfg.lora_target_modules)
        try:
            with quiet_peft():
                wrapped = get_peft_model(encoder, config)
        except ValueError as e:  # a layer PEFT cannot adapt (a LayerNorm)
            raise UserError(f"--lora_target_modules {cfg.lora_target_modules}: {first_line(e)}") from None
        if cfg.gradient_checkpointing:
            wrapped.enable_input_require_grads()
        setattr(model, name, wrapped)
    return model


def check_targets(encoder, targets, flag: str) -> None:
    """Every named target is a layer of the encoder: PEFT adapts the names it finds and passes over the others."""
    if targets == "all-linear":
        return
    unknown = sorted(set(targets) - {path.rsplit(".", 1)[-1] for path, _ in encoder.named_modules()})
    if unknown:
        linear = sorted({path.rsplit(".", 1)[-1] for path, m in encoder.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise UserError(f"--lora_target_modules {flag}: the encoder has no layer named {', '.join(unknown)} (its "
                        f"linear layers: {', '.join(linear)})")


def load_lora(model, folders: dict[str, Path], base: str):
    """`model`'s encoders (the weights of --model `base`, loaded by from_pretrained) with the adapters saved in
    `folders` ({"encoder": path, ...}), for inference."""
    from peft import PeftModel

    for name, folder in folders.items():
        try:
            with quiet_peft():
                setattr(model, name, PeftModel.from_pretrained(getattr(model, name), str(folder)))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: another base's shapes
            raise UserError(f"{folder}: cannot load its LoRA adapter onto --model {base} "
                            f"({first_line(e)[:150]})") from None
    return model


@contextlib.contextmanager
def quiet_peft():
    """PEFT asks transformers' deprecated is_gradient_checkpointing, a FutureWarning per encoder: noise in a log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def base_digest(encoder_state: dict) -> str:
    """sha256 of an adapted encoder's frozen weights (its state dict without the adapters): saved with the adapter,
    and checked when it is loaded onto --model again, so that another base of the same shapes (a new revision, another
    package version) is an error, not an adapter silently applied to weights it was not trained with."""
    digest = hashlib.sha256()
    for key in sorted(k for k in encoder_state if "lora_" not in k):
        digest.update(key.encode())
        digest.update(encoder_state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_adapter(folder: Path) -> bool:
    """Whether a checkpoint's encoder folder holds a LoRA adapter (else a whole save_pretrained encoder)."""
    return (folder / ADAPTER_CONFIG).exists()
