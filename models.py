"""The task registry, the encoder and its heads, and the loss.

Every task reads (criterion description, text) pairs through one Hugging Face encoder. What differs per task is
in `TASKS`: which examples it builds, whether long texts become windows, which heads it trains, the metric that
early stopping and HPO watch, and the metrics a reader sees first. `TaskModel.forward` returns the loss when the
batch holds targets, with one branch per head: the place to change a loss.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import features
from config import Config, post_encoding, pretrained, sentence_unit
from lora import add_lora
from packaged_encoders import model_source
from utils import UserError

log = logging.getLogger("redsm5")


@dataclass(frozen=True)
class Task:
    examples: Callable  # (corpus, post_ids, cfg) -> list of example dicts (data.py)
    windows: Callable  # cfg -> whether texts are cut into overlapping windows
    classify: bool  # trains the has-evidence / status head (classification metrics)
    spans: bool  # trains the evidence head (span and sentence-set metrics)
    main_metric: str  # default early-stopping and HPO metric
    headline: tuple  # the metrics a reader sees first: the end-of-run summary and the model card, in this order


def _criteria_examples(corpus, post_ids, cfg):
    return data.sentence_examples(corpus, post_ids) if sentence_unit(cfg) else data.post_examples(corpus, post_ids)


TASKS = {
    "criteria": Task(_criteria_examples, lambda cfg: not sentence_unit(cfg), classify=True, spans=False,
                     main_metric="f1_macro",
                     headline=("f1_macro", "f1", "precision", "recall", "auroc", "accuracy", "paper_micro_f1",
                               "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned", "n")),
    "evidence": Task(lambda corpus, ids, cfg: data.post_examples(corpus, ids,
                                                               require_evidence=not cfg.include_negatives),
                     lambda cfg: True, classify=False, spans=True, main_metric="span_f1",
                     headline=("span_f1", "exact_match", "sentence_f1", "set_exact_match", "null_accuracy",
                               "n_pairs")),
    "joint": Task(lambda corpus, ids, cfg: data.post_examples(corpus, ids),
                  lambda cfg: True, classify=True, spans=True, main_metric="combined",
                  headline=("combined", "f1_macro", "f1", "precision", "recall", "auroc", "accuracy",
                            "paper_micro_f1", "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned",
                            "span_f1", "exact_match", "sentence_f1", "set_exact_match", "n", "n_pairs")),
}


def featurize(cfg: Config, tokenizer, examples: list[dict]) -> list[dict]:
    """Model inputs of `examples` as cfg's task and encoding read them (features.featurize / featurize_posts)."""
    if not examples:  # none: the tokenizers raise IndexError on an empty batch
        return []
    if post_encoding(cfg):
        return features.featurize_posts(tokenizer, examples, cfg.max_length, cfg.doc_stride, cfg.max_windows_per_post)
    return features.featurize(tokenizer, examples, cfg.max_length, cfg.doc_stride, TASKS[cfg.task].windows(cfg),
                              cfg.max_windows_per_post)


# --------------------------------------------------------------------------- tokenizer and encoder

TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # the tiny tokenizer's first ids, in this order


def train_tiny_tokenizer(texts, vocab_size: int):
    """WordPiece tokenizer trained on the training texts: the offline stand-in for a hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = TINY_SPECIALS
    texts = list(texts)
    trainee = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainee.normalizer = normalizers.BertNormalizer(lowercase=True)
    trainee.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the "##c" pieces in hash-map order, which differs between processes and
    # decides which merges win ties: numbered first (as trainer-only specials), the vocabulary is a
    # function of the texts, so a config reproduces its run in a fresh process.
    words = (w for t in texts for w, _ in trainee.pre_tokenizer.pre_tokenize_str(trainee.normalizer.normalize_str(t)))
    pieces = sorted({c for w in words for c in w[1:]})
    trainee.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials + [f"##{c}" for c in pieces], show_progress=False))
    tok = Tokenizer(models.WordPiece(trainee.get_vocab(), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_encoder_config(cfg: Config, vocab_size: int):
    from transformers import BertConfig, ModernBertConfig

    if cfg.tiny_arch == "modernbert":
        cls, sep = TINY_SPECIALS.index("[CLS]"), TINY_SPECIALS.index("[SEP]")
        return ModernBertConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_hidden, num_hidden_layers=cfg.tiny_layers,
                                num_attention_heads=cfg.tiny_heads, intermediate_size=2 * cfg.tiny_hidden,
                                max_position_embeddings=max(512, cfg.max_length), local_attention=64,
                                # local and global layers alternate, the last one global:
                                # [CLS] then reads the whole window
                                layer_types=["sliding_attention" if (cfg.tiny_layers - i) % 2 == 0 else "full_attention"
                                             for i in range(cfg.tiny_layers)],
                                pad_token_id=TINY_SPECIALS.index("[PAD]"), cls_token_id=cls, sep_token_id=sep,
                                bos_token_id=cls, eos_token_id=sep)
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_hidden, num_hidden_layers=cfg.tiny_layers,
                      num_attention_heads=cfg.tiny_heads, intermediate_size=4 * cfg.tiny_hidden,
                      max_position_embeddings=max(512, cfg.max_length))


def build_tokenizer(cfg: Config, train_texts):
    if not pretrained(cfg):
        return train_tiny_tokenizer(list(data.CRITERIA.values()) + list(train_texts), cfg.tiny_vocab)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"--model {cfg.model}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def drop_pooler(encoder):
    """Our heads read the hidden states; an unused pooler would make DDP wait for its gradients."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def max_positions(encoder) -> int | None:
    """The longest input the encoder takes. RoBERTa-like embeddings (those with a padding_idx) number positions
    from padding_idx + 1: roberta-base has 514 position embeddings and takes 512 tokens."""
    n = getattr(encoder.config, "max_position_embeddings", None)
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return None if n is None else n - (padding_idx + 1 if padding_idx is not None else 0)


def attention(cfg: Config, loading: bool = False) -> dict:
    """from_pretrained's attn_implementation for --attn_implementation (none for auto: the library's default).
    flash_attention_2 without CUDA or flash_attn is refused for training; a checkpoint trained with it loads with the
    default kernel (the same weights) where it is not available."""
    if cfg.attn_implementation == "auto":
        return {}
    if cfg.attn_implementation == "flash_attention_2" and not flash_attention_available():
        if loading:
            log.warning("attn_implementation flash_attention_2: not available here (needs CUDA and flash_attn); "
                        "the library's default kernel is used")
            return {}
        raise UserError("--attn_implementation flash_attention_2: needs a CUDA GPU and the flash_attn package (pip "
                        "install flash-attn); use sdpa or eager")
    return {"attn_implementation": cfg.attn_implementation}


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def build_encoder(cfg: Config, vocab_size: int, loading: bool = False):
    """The tiny encoder from its config, or --model's pretrained weights (also the base of a LoRA checkpoint that
    evaluate.py is `loading`)."""
    from transformers import AutoModel

    if not pretrained(cfg):  # sized to fit: max_position_embeddings >= max_length
        return drop_pooler(AutoModel.from_config(tiny_encoder_config(cfg, vocab_size),
                                                 **{"attn_implementation": "sdpa", **attention(cfg)}))
    try:
        encoder = AutoModel.from_pretrained(model_source(cfg.model), trust_remote_code=cfg.trust_remote_code,
                                            **attention(cfg, loading))
    except OSError as e:
        raise UserError(f"--model {cfg.model}: cannot load it ({str(e).splitlines()[0]})") from None
    longest = max_positions(encoder)
    if longest is not None and cfg.max_length > longest:  # it would index past its position embeddings
        raise UserError(f"--max_length {cfg.max_length}: the encoder {cfg.model} takes at most {longest} tokens; "
                        f"use --max_length {longest} or less")
    return drop_pooler(encoder)


# --------------------------------------------------------------------------- model and loss

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "criterion_ids")  # what a batch feeds the encoder


class TaskModel(nn.Module):
    """Encoder(s) with a classification head (max over the tokens, or [CLS]) and/or an evidence head on every token
    (start/end logits, or one "inside an evidence sentence" tag logit).

    With `criterion_heads` each head has one set of outputs per criterion and a pair reads those
    of its own criterion: the encoder then only has to say which symptom a sentence shows, not
    also match it against the criterion text (which a small encoder trained from scratch fails to learn).
    """

    def __init__(self, task: Task, encoder, second_encoder=None, dropout: float = 0.1, criterion_heads: bool = True,
                 pooling: str = "max", evidence_head: str = "span", loss_weights: tuple = (1.0, 1.0),
                 class_weights: torch.Tensor | None = None):
        super().__init__()
        self.pooling, self.per_token = pooling, 2 if evidence_head == "span" else 1  # start + end, or one tag
        self.task, self.encoder, self.span_encoder = task, encoder, second_encoder
        hidden, self.n_heads = encoder.config.hidden_size, len(data.SYMPTOMS) if criterion_heads else 1
        self.token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self.dropout = nn.Dropout(dropout)
        self.cls_head = nn.Linear(hidden, 2 * self.n_heads) if task.classify else None
        self.span_head = nn.Linear(hidden, self.per_token * self.n_heads) if task.spans else None
        self.loss_weight_criteria, self.loss_weight_evidence = loss_weights  # joint: w_c, w_e
        # from the training labels, not learned: kept out of the saved weights (persistent=False), moved by .to()
        self.register_buffer("class_weights", class_weights, persistent=False)

    def _own(self, logits, criterion_ids, k: int = 2):
        """(..., n_heads * k) -> the outputs of each pair's criterion, (..., k); with no criterion_ids
        (`--encoding post`: one window, every criterion) all of them, (batch, [width,] n_heads, k)."""
        if self.n_heads == 1:
            return logits
        logits = logits.unflatten(-1, (self.n_heads, k))
        if criterion_ids is None:
            return logits
        rows = torch.arange(len(criterion_ids), device=logits.device)
        return logits[rows, criterion_ids] if logits.dim() == 3 else logits[rows, :, criterion_ids]

    def forward(self, input_ids, attention_mask, token_type_ids=None, criterion_ids=None, labels=None,
                start_targets=None, end_targets=None, tag_targets=None, context_mask=None, pair_mask=None, **_):
        """cls_logits (batch, [criteria,] 2); start/end_logits (or tag_logits, `--evidence_head tag`) (batch,
        [criteria,] width): the criteria dimension only under `--encoding post` (no criterion_ids in the batch).
        With the targets of the task's heads in the batch, also "loss"."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.token_types:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        out = {}
        if self.cls_head is not None:
            if self.pooling == "max":
                pooled = hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).amax(1)
            else:
                pooled = hidden[:, 0]
            out["cls_logits"] = self._own(self.cls_head(self.dropout(pooled)), criterion_ids)
        if self.span_head is not None:
            span_hidden = self.span_encoder(**inputs).last_hidden_state if self.span_encoder is not None else hidden
            logits = self._own(self.span_head(self.dropout(span_hidden)), criterion_ids, self.per_token).float()
            if logits.dim() == 4:  # (batch, width, criteria, 2) -> (batch, criteria, width, 2)
                logits = logits.transpose(1, 2)
            pad = attention_mask.view(len(attention_mask), *[1] * (logits.dim() - 3), -1, 1) == 0
            logits = logits.masked_fill(pad, -1e4)  # never point at padding
            if self.per_token == 2:
                out["start_logits"], out["end_logits"] = logits.unbind(-1)
            else:
                out["tag_logits"] = logits.squeeze(-1)
        evidence_targets = start_targets if self.per_token == 2 else tag_targets
        if (self.cls_head is None or labels is not None) and (self.span_head is None or evidence_targets is not None):
            out["loss"] = self.loss(out, labels, start_targets, end_targets, tag_targets, context_mask, pair_mask,
                                    criterion_ids)
        return out

    def loss(self, out, labels, start_targets, end_targets, tag_targets, context_mask, pair_mask,
             criterion_ids=None) -> torch.Tensor:
        """criteria: cross-entropy of the status (weighted by class_weights when given: (2,) pooled, or (9, 2) each
        criterion's own, read by the row's criterion; a weighted mean either way, as F.cross_entropy's). evidence,
        span head: the mean span loss of start and end; tag head: BCE of "inside an evidence sentence" over the text
        tokens. joint: w_c * criteria + w_e * evidence. Under `--encoding post` every criterion of a window counts
        (labels -100 and pair_mask drop the (window, criterion) rows that are not examples).
        joint's tag BCE is balanced: (mean over evidence tokens + mean over the rest) / 2: about 1% of its tokens
        are evidence, and the plain mean teaches "no evidence" everywhere
        (results/2026-12-05_pretrained-post-level.md)."""
        criteria_loss = evidence_loss = None
        if self.cls_head is not None:
            logits = out["cls_logits"].float()
            if self.class_weights is None or self.class_weights.dim() == 1:
                criteria_loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), weight=self.class_weights,
                                                ignore_index=-100)
            else:  # per criterion: a pair's from criterion_ids, a post window's (batch, criteria) from the column
                criteria = criterion_ids if logits.dim() == 2 else torch.arange(labels.shape[-1], device=labels.device)
                y = labels.clamp(min=0)
                weight = self.class_weights[criteria.expand_as(labels), y] * (labels != -100)
                nll = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), reduction="none")
                criteria_loss = (nll * weight.reshape(-1)).sum() / weight.sum().clamp(min=1e-12)
        if self.span_head is not None and self.per_token == 2:
            evidence_loss = (span_loss(out["start_logits"], start_targets, pair_mask)
                             + span_loss(out["end_logits"], end_targets, pair_mask)) / 2
        elif self.span_head is not None:
            mask = context_mask if pair_mask is None else context_mask.unsqueeze(1) & pair_mask.unsqueeze(-1)
            bce = F.binary_cross_entropy_with_logits(out["tag_logits"].float(), tag_targets.float(), reduction="none")
            if self.cls_head is None:
                evidence_loss = (bce * mask).sum() / mask.sum().clamp(min=1)
            else:  # joint: the mean over evidence tokens and the mean over the others, halved (see loss())
                pos, neg = mask & tag_targets.bool(), mask & ~tag_targets.bool()
                evidence_loss = ((bce * pos).sum() / pos.sum().clamp(min=1)
                                 + (bce * neg).sum() / neg.sum().clamp(min=1)) / 2
        if evidence_loss is None:
            return criteria_loss
        if criteria_loss is None:
            return evidence_loss
        return self.loss_weight_criteria * criteria_loss + self.loss_weight_evidence * evidence_loss


def span_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log of the probability mass on the gold positions (several when a window holds several evidence
    sentences; with one it is plain cross-entropy). `mask` picks the rows that count."""
    logits = logits.float()  # fp32 also where a wrapper cast outputs (FSDP)
    loss = logits.logsumexp(-1) - logits.masked_fill(~targets, float("-inf")).logsumexp(-1)
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def build_model(cfg: Config, tokenizer, class_weights: torch.Tensor | None = None) -> TaskModel:
    task = TASKS[cfg.task]
    encoder = build_encoder(cfg, len(tokenizer))
    second = build_encoder(cfg, len(tokenizer)) if cfg.task == "joint" and not cfg.shared_encoder else None
    model = TaskModel(task, encoder, second, cfg.dropout, cfg.criterion_heads, cfg.pooling, cfg.evidence_head,
                      (cfg.loss_weight_criteria, cfg.loss_weight_evidence), class_weights)
    if cfg.gradient_checkpointing:
        for enc in (encoder, second):
            if enc is not None:
                enc.gradient_checkpointing_enable()
    return add_lora(model, cfg) if cfg.lora else model
