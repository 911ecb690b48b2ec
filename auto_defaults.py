"""What `auto` means for `lr`, `epochs` and `batch_size`: a number per model kind (tiny or pretrained, pair or post
encoding), and for a pretrained encoder's rate a rule on its width, each with the measurement or publication it comes
from. config.make_config resolves them once, so config.yaml, MLflow and best_config.yaml carry numbers.
"""
from __future__ import annotations

import dataclasses

from config import Config, post_encoding, pretrained
from packaged_encoders import encoder_shape

# What `auto` means, per model kind (a pretrained encoder, or tiny, under pair or post encoding): the tiny encoder
# learns from scratch and takes a large rate; a pretrained one is fine-tuned. Chosen on the demo, each by the runs on
# its results page: results/2026-12-05_pretrained-defaults.md (lr), results/2026-12-05_pretrained-post-level.md
# (batch 8 under post encoding), results/2026-12-02_post-encoding-and-evidence-sets.md (tiny_post epochs); 5 epochs
# for a pretrained encoder under post encoding on the written corpus: results/2026-12-06_epochs-written-corpus.md.
AUTO_DEFAULTS = {"lr": {"tiny": 2e-3, "tiny_post": 2e-3, "pretrained": None, "pretrained_post": None},  # by width
                 "epochs": {"tiny": 4, "tiny_post": 8, "pretrained": 3, "pretrained_post": 5},
                 "batch_size": {"tiny": 32, "tiny_post": 32, "pretrained": 32, "pretrained_post": 8}}


# `lr: auto` of a pretrained encoder follows its width (hidden_size in its config.json): the first row whose width
# bound (and model_type, where one is named) fits gives (rate, where it comes from). Never above what the encoder
# family's own authors fine-tuned at, but where a measurement justifies it (MiniLM-L6, MPNet-base). Sources, and the
# table behind the rule: results/2026-12-06_encoder-rates.md.
AUTO_LR_BY_WIDTH = [
    (384, None, 2e-4, "measured on MiniLM-L6 (6 x 384): results/2026-12-05_pretrained-defaults.md (demo) and "
                      "results/2026-12-06_written-corpus-first-measurement.md (written corpus)"),
    (768, "mpnet", 5e-5, "measured on MPNet-base (12 x 768): written corpus, fold 0, 5e-5 above 2e-5 on validation "
                         "and test; results/2026-12-07_mpnet-written-corpus.md"),
    (768, None, 2e-5, "published for 12 x 768 encoders, not measured here: inside BERT-base's (2e-5 to 5e-5) and "
                      "RoBERTa-base's (1e-5 to 3e-5) grids, below DeBERTa-v3-base's (2.5e-5) and ModernBERT-base's "
                      "(up to 8e-5), the ReDSM5 authors' own; results/2026-12-06_encoder-rates.md"),
    (None, "deberta-v2", 6e-6, "published for DeBERTa-v3-large (its model card's MNLI run), not measured here; "
                               "results/2026-12-06_encoder-rates.md"),
    (None, None, 1e-5, "published for 24 x 1024 encoders, not measured here: the bottom of RoBERTa-large's grid "
                       "(1e-5 to 3e-5), below BERT-large's (2e-5 to 5e-5); results/2026-12-06_encoder-rates.md"),
]
# `lr: auto` under --lora, by width as above: the adapters start at zero and the encoder is frozen, so they train at
# about ten times full fine-tuning's rate. Hu et al. 2021 (LoRA, Table 9): RoBERTa-base 4e-4 to 5e-4, RoBERTa-large
# 2e-4 to 4e-4 (full fine-tuning: 1e-5 to 3e-5); 1e-3 on MiniLM-L6: results/2026-12-06_lora-and-attention.md.
AUTO_LORA_LR_BY_WIDTH = [(384, 1e-3, "LoRA: 5x MiniLM-L6's full fine-tuning rate (2e-4), toward the LoRA paper's "
                                     "10-20x; results/2026-12-06_lora-and-attention.md"),
                         (768, 5e-4, "LoRA, published for RoBERTa-base (Hu et al. 2021), not measured here"),
                         (None, 3e-4, "LoRA, published for RoBERTa-large (Hu et al. 2021), not measured here")]
UNKNOWN_WIDTH = "its config.json could not be read, so the rate published for 12 x 768 encoders, not measured here"


def auto_lr(cfg) -> tuple[float, str]:
    """(rate, where it comes from) of `lr: auto` for this config's encoder."""
    if not pretrained(cfg):
        return AUTO_DEFAULTS["lr"]["tiny"], "tiny, trained from scratch: results/2026-12-02_single-split-defaults.md"

    shape = encoder_shape(cfg.model)
    layers, width, model_type = shape or (12, 768, None)  # unreadable: as a 12 x 768 encoder of no measured family
    if cfg.lora:
        rate, source = next((r, src) for top, r, src in AUTO_LORA_LR_BY_WIDTH if top is None or width <= top)
    else:
        rate, source = next((r, src) for top, family, r, src in AUTO_LR_BY_WIDTH
                            if (top is None or width <= top) and family in (None, model_type))
    return rate, f"{layers} x {width}: {source}" if shape else UNKNOWN_WIDTH


def resolve_auto(cfg: Config) -> Config:
    """`auto` fields replaced by the number for this model (AUTO_DEFAULTS), once, here: config.yaml, MLflow params
    and HPO's best_config.yaml then carry the number, and a rerun from config.yaml is the same run."""
    kind = ("pretrained" if pretrained(cfg) else "tiny") + ("_post" if post_encoding(cfg) else "")
    chosen = {name: values[kind] for name, values in AUTO_DEFAULTS.items() if getattr(cfg, name) == "auto"}
    if chosen.get("lr", 0) is None:
        chosen["lr"] = auto_lr(cfg)[0]
    return dataclasses.replace(cfg, **chosen) if chosen else cfg


def changed_fields(cfg: Config) -> dict:
    """The fields a run sets away from the defaults: an `auto` field counts only when it differs from what `auto`
    gives this model (a bare `python train.py` then shows {})."""
    auto = resolve_auto(dataclasses.replace(cfg, **{name: "auto" for name in AUTO_DEFAULTS}))
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if v != getattr(Config, k) and not (getattr(Config, k) == "auto" and v == getattr(auto, k))}
