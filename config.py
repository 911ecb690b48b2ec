"""The run's configuration: one dataclass field per knob, with its help text and what it is.

Every field carries its tags once (`knob`): `data` (the split, tokenizer or features depend on it: the data
cache key, and a resume may not change it), `resume` (a resumed run may change it: how long or how verbosely
it trains, not what), `hpo=False` (trials are compared on it or write to it: never sampled), and its allowed
range. The data cache key, the resume allowance, HPO's fixed fields, the range checks and `--help` are all
derived from these tags (DATA_FIELDS, RESUMABLE_FIELDS, HPO_FIXED_FIELDS, validate_config, cli.parse_config).

Precedence: dataclass defaults < --config YAML < --field flags.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from files import write_text_atomic
from utils import UserError, read_yaml


def knob(default, help: str = "", *, data: bool = False, resume: bool = False, hpo: bool = True,
         low: float | None = None, above: float | None = None, high: float | None = None, below: float | None = None):
    """A Config field with its --help text and tags. Its allowed range: low / high are inclusive bounds, above / below
    exclusive ones (check_range; `None` and `auto` are not numbers and pass)."""
    return dataclasses.field(default=default, metadata={"help": help, "data": data, "resume": resume, "hpo": hpo,
                                                         "low": low, "above": above, "high": high, "below": below})


@dataclass
class Config:
    # --- task and data
    task: typing.Literal["criteria", "evidence", "joint"] = knob("criteria", data=True, hpo=False,
        help="what to train (models.TASKS)")
    data_dir: str | None = knob(None, 'ReDSM5 csv folder; None = the generated demo corpus', data=True, hpo=False)
    demo_posts: int = knob(1000, 'size of the demo corpus when data_dir is None', data=True, hpo=False, low=1)
    demo_seed: int = knob(0, data=True, hpo=False, low=0, below=2**32,
                          help="the demo corpus is a pure function of (demo_posts, demo_seed)")
    unit: typing.Literal["sentence", "post"] = knob("sentence", data=True, hpo=False,
        help="criteria examples: annotated sentence, or post x 9 criteria")
    include_negatives: bool = knob(False, data=True, hpo=False,
        help="evidence: also train (criterion, post) pairs without evidence, to the null answer")
    include_special_case: bool = knob(False, 'keep ReDSM5 SPECIAL_CASE rows (dropped and counted otherwise)', data=True)
    fuzzy_threshold: float = knob(0.3, data=True, low=0, below=1,
        help="min word-sequence similarity to align a paraphrased sentence to a post sentence")
    val_ratio: float = knob(0.1, data=True, hpo=False, low=0, below=1,
        help="post-level split fractions; train gets the rest")
    test_ratio: float = knob(0.1, 'fraction of posts in the test split', data=True, hpo=False, low=0, below=1)
    splits_file: str | None = knob(None, data=True, hpo=False,
        help="reuse the post split of an earlier run (its splits.json)")
    demo_shift_posts: int = knob(200, data=True, low=0,
        help="demo: posts of the shifted test set (held-out phrasing) scored as test_shift; 0: none")
    test_shift_dir: str | None = knob(None, data=True,
        help="a second ReDSM5 folder scored as test_shift (replaces the demo's shift set)")
    # --- model
    model: str = knob("tiny", data=True,
        help="'tiny' (built offline), 'minilm' (pip package, packaged_encoders.SHORT_NAMES), a hub name or "
             "local dir")
    tiny_arch: typing.Literal["modernbert", "bert"] = knob("modernbert",
        help="tiny encoder: ModernBERT (rotary positions, local+global attention) or BERT (learned "
             "absolute positions)")
    tiny_hidden: int = knob(128, 'width of the tiny encoder', low=1)
    tiny_layers: int = knob(2, 'depth of the tiny encoder', low=1)
    tiny_heads: int = knob(2, 'attention heads of the tiny encoder', low=1)
    tiny_vocab: int = knob(8000, 'WordPiece vocabulary trained on the training texts', data=True, low=1)
    dropout: float = knob(0.1, 'dropout of the task heads', low=0, below=1)
    shared_encoder: bool = knob(True, 'joint: one encoder for both heads (False = two encoders)')
    pooling: typing.Literal["max", "cls"] = knob("max",
        help="what the classification head reads: max over the tokens (a post shows a symptom if any"
             " sentence does) or [CLS]")
    criterion_heads: bool = knob(True,
        help="one head output per criterion, picked by the pair's criterion (False = one for all)")
    encoding: typing.Literal["pair", "post"] = knob("post", data=True,
        help="post-level tasks: 'pair' reads (criterion text, post) once per criterion; 'post' reads"
             " each post window once and takes all nine criteria's outputs from it (the per-"
             "criterion heads tell them apart)")
    evidence_head: typing.Literal["span", "tag"] = knob("tag",
        help="evidence: 'span' = start/end logits per token (SQuAD), a sentence scored by its best "
             "span; 'tag' = one logit per token, 'inside an evidence sentence' (BCE), a sentence "
             "scored by the mean over its tokens")
    max_length: int = knob(256, 'tokens per (criterion, text) window', data=True, low=1)
    doc_stride: int = knob(64, 'overlap between consecutive windows of a long post', data=True, low=0)
    max_windows_per_post: int = knob(256, data=True, low=1,
        help="most windows one post (or one pair's text) is cut into; the rest of a longer text is not read, and "
             "a warning counts what was cut (256 windows of 256 tokens: about 50k tokens)")
    max_answer_tokens: int = knob(96, 'longest span the decoder may return', low=1)
    n_best: int = knob(5, 'span candidates kept per window', low=1)
    gradient_checkpointing: bool = knob(False, 'trade compute for memory')
    trust_remote_code: bool = knob(False, 'only for hub models that need it', data=True)
    attn_implementation: typing.Literal["auto", "sdpa", "eager", "flash_attention_2"] = knob("auto",
        help="the encoder's attention kernel (from_pretrained's attn_implementation); auto: the library's default "
             "(sdpa where the model has it), and sdpa for tiny; flash_attention_2 needs CUDA and flash_attn")
    lora: bool = knob(False,
        help="train LoRA adapters (PEFT) on the frozen pretrained encoder and the heads in full; the checkpoint keeps "
             "the adapter and names the base by --model (lora.py); lr: auto takes LoRA's rates (AUTO_LORA_LR_BY_WIDTH)")
    lora_rank: int = knob(8, 'rank r of each LoRA update', low=1)
    lora_alpha: float = knob(16.0, 'LoRA scale: the update B @ A is multiplied by lora_alpha / lora_rank', above=0)
    lora_dropout: float = knob(0.1, low=0, below=1,
        help="dropout on the input of each LoRA update (on a CPU 0.1 makes a step 27% slower than 0: "
             "results/2026-12-06_lora-and-attention.md)")
    lora_target_modules: str = knob("all-linear",
        help="the encoder's linear layers that get adapters: all-linear, or comma-separated module names (query,value: "
             "the LoRA paper's choice for BERT)")
    # --- optimisation
    epochs: int | typing.Literal["auto"] = knob("auto", resume=True, low=1,
        help="auto: tiny 4 (8 under post encoding), pretrained 3 (5 under post encoding) (AUTO_DEFAULTS)")
    max_steps: int = knob(-1, '> 0 caps the number of optimizer steps', resume=True)
    batch_size: int | typing.Literal["auto"] = knob("auto", low=1,
        help="per process; auto: 32, 8 for a pretrained encoder under post encoding (AUTO_DEFAULTS)")
    eval_batch_size: int = knob(64, 'per process', resume=True, low=1)
    grad_accum: int = knob(1, 'micro-batches per optimizer step', low=1)
    lr: float | typing.Literal["auto"] = knob("auto", above=0,
        help="auto: 2e-3 for tiny (from scratch); a pretrained encoder's by its width (AUTO_LR_BY_WIDTH): 2e-4 up "
             "to 384 (measured), 5e-5 for MPNet-base (measured), 2e-5 other 768-wide, 1e-5 wider (published)")
    head_lr: float | None = knob(None, above=0,
        help="learning rate of the task heads, which start from random while a pretrained encoder does not; none: "
             "the same as lr")
    layer_decay: float = knob(1.0, "layer-wise rate decay: encoder layer l of L trains at lr * layer_decay ** (L - l), "
                              "its embeddings at lr * layer_decay ** L; 1 = one rate (0.9 measured level)",
                              above=0, high=1)
    weight_decay: float = knob(0.01, 'not applied to biases and LayerNorm weights', low=0)
    adam_beta1: float = knob(0.9, 'AdamW beta1', low=0, below=1)
    adam_beta2: float = knob(0.999, 'AdamW beta2', low=0, below=1)
    adam_eps: float = knob(1e-8, 'AdamW epsilon', above=0)
    scheduler: typing.Literal["cosine", "linear", "constant"] = knob("linear", 'learning-rate schedule after warmup')
    warmup_ratio: float = knob(0.06, 'fraction of optimizer steps spent warming up', low=0, below=1)
    max_grad_norm: float = knob(1.0, 'gradient clipping on sync steps; 0 disables', low=0)
    class_weights: bool = knob(False, 'criteria, joint: weight CE by inverse class frequency, pooled over the criteria')
    criterion_weights: bool = knob(False, "criteria, joint: weight each criterion's CE by the inverse frequencies of "
                                   "its own two classes in the training inputs (a rare symptom's positives weigh more)")
    loss_weight_criteria: float = knob(1.0, 'joint: w_c', low=0)
    loss_weight_evidence: float = knob(1.0, 'joint: w_e', low=0)
    mixed_precision: typing.Literal["auto", "no", "fp16", "bf16"] = knob("auto", 'auto = what `accelerate launch` says')
    dynamo_backend: typing.Literal["auto", "no", "inductor", "aot_eager", "eager", "cudagraphs"] = knob("auto",
        help="torch.compile the model with this backend (accelerate's dynamo setting); auto = what `accelerate "
             "launch` says (no, unless told)")
    # --- early stopping and checkpoints
    early_stopping_metric: str = knob("auto", "validation metric to watch; auto = the task's main metric", hpo=False)
    early_stopping_mode: typing.Literal["max", "min"] = knob("max", hpo=False,
        help="max: a larger metric is better; min: a smaller one")
    eval_every: int = knob(0, low=0, hpo=False,
        help="validate every N optimizer steps, and after the last one (0 = after every epoch); the best checkpoint "
             "and --patience count these validations. Not changed on resume: it decides which checkpoint is best")
    patience: int = knob(3, 'validations without improvement before stopping; 0 disables', resume=True, low=0)
    min_delta: float = knob(1e-4, 'smallest change that counts as an improvement', low=0)
    resume: bool = knob(False, 'continue the run in output_dir from checkpoints/last', resume=True, hpo=False)
    save_every: int = knob(0, resume=True, low=0,
        help="also write checkpoints/last every N optimizer steps (0 = once per epoch)")
    keep_checkpoints: int = knob(1, resume=True, low=1,
        help="training states kept: the newest is checkpoints/last, older ones checkpoints/step-N")
    skip_nonfinite: bool = knob(False, resume=True,
        help="skip a step whose loss is NaN/inf (costs a host sync per step) instead of stopping")
    # --- runtime
    seed: int = knob(42, data=True, hpo=False, low=0, below=2**32,
                     help="seeds the split, the initialisation and the batch order")
    deterministic: bool = knob(False, 'torch.use_deterministic_algorithms: exact repeats, slower', resume=True)
    cudnn_benchmark: bool = knob(True, 'let cuDNN pick the fastest kernels (GPU only)', resume=True)
    cudnn_attention: bool = knob(False, resume=True,
        help="cuDNN's fused attention (GPU): it plans anew for every new batch shape")
    tf32: bool = knob(True,
        help="TF32 matmuls on Ampere and later GPUs (torch.set_float32_matmul_precision('high')): "
             "PyTorch leaves them off")
    num_workers: int = knob(0, resume=True, low=0,
        help="DataLoader workers; features are pre-tokenised, so 0 is fastest on CPU")
    threads: int = knob(0, resume=True, low=0,
        help="torch CPU threads per process; 0 = the machine's cores shared among its processes")
    output_dir: str = knob("auto", resume=True, hpo=False,
                           help="where the run writes; auto: a new folder outputs/<task>/<date>_<time> each run (a "
                                "moved run folder resumes where it is)")
    overwrite_output_dir: bool = knob(False, resume=True, hpo=False,
                                      help="let a new run replace the run in an explicit --output_dir")
    log_every: int = knob(10, 'steps between progress/MLflow loss points', resume=True, low=1)
    # --- tracking
    mlflow: bool = knob(True, 'track the run in MLflow', resume=True, hpo=False)
    tracking_uri: str | None = knob(None, resume=True, hpo=False,
        help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = knob("redsm5", 'MLflow experiment name', resume=True, hpo=False)
    run_name: str | None = knob(None, 'MLflow run name (default <task>-<output_dir name>)', resume=True, hpo=False)
    mlflow_system_metrics: bool = knob(False, resume=True,
        help="CPU, memory, disk (and GPU with pynvml) every 10 s; needs psutil")
    mlflow_log_model: bool = knob(False, resume=True,
        help="log checkpoints/best as an MLflow pyfunc model (runs:/<run id>/model: mlflow.pyfunc.load_model, "
             "mlflow models serve)")
    mlflow_register_model: str | None = knob(None, resume=True,
        help="also register the model --mlflow_log_model logs in the model registry under this name (refused "
             "without --mlflow_log_model: it would register nothing)")


def pretrained(cfg) -> bool:
    """Whether the encoder starts from trained weights (anything but the tiny encoder built from a config)."""
    return cfg.model != "tiny"


# The names of the earlier project's guide (TRAINING_INFRASTRUCTURE.md), which our users come from: each is named
# in the error an unknown flag or YAML key gets, never accepted as a second name of a field.
SEED_NAMES = {"num_epochs": "epochs", "learning_rate": "lr", "gradient_clip": "max_grad_norm",
              "gradient_accumulation_steps": "grad_accum", "train_batch_size": "batch_size", "amp": "mixed_precision",
              "training.epochs": "epochs", "training.num_epochs": "epochs", "training.learning_rate": "lr",
              "training.train_batch_size": "batch_size", "training.batch_size": "batch_size",
              "training.gradient_accumulation_steps": "grad_accum", "training.gradient_clip": "max_grad_norm",
              "training.seed": "seed", "training.deterministic": "deterministic",
              "training.cudnn_benchmark": "cudnn_benchmark", "amp.enabled": "mixed_precision",
              "amp.dtype": "mixed_precision", "early_stopping.metric": "early_stopping_metric",
              "early_stopping.mode": "early_stopping_mode", "early_stopping.patience": "patience",
              "early_stopping.min_delta": "min_delta", "optimizer.betas": "adam_beta1 and adam_beta2",
              "optimizer.eps": "adam_eps", "scheduler.type": "scheduler", "scheduler.warmup_ratio": "warmup_ratio"}
SEED_SECTIONS = ("training", "amp", "early_stopping", "optimizer", "scheduler")


def seed_name(name: str) -> str | None:
    """Our field(s) for a name of the earlier guide ('training.learning_rate' or 'learning_rate': 'lr'), or None."""
    return SEED_NAMES.get(name) or SEED_NAMES.get(name.split(".", 1)[-1])


def seed_hint(name: str, as_flag: bool) -> str | None:
    """'--gradient_accumulation_steps is --grad_accum here'-style advice for a name of the earlier guide."""
    ours = seed_name(name)
    if ours is None:
        return None
    spell = (lambda n: " and ".join(f"--{x}" for x in n.split(" and "))) if as_flag else (lambda n: n)
    hint = f"{'--' if as_flag and '.' not in name else ''}{name} is {spell(ours)} here"
    if ours == "mixed_precision":
        hint += " (no, fp16 or bf16)"
    return hint


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


# Derived from the tags: adding a field means writing it once, above.
DATA_FIELDS = tuple(name for name, f in config_fields().items() if f.metadata["data"])  # the data cache key
RESUMABLE_FIELDS = frozenset(name for name, f in config_fields().items() if f.metadata["resume"])
HPO_FIXED_FIELDS = frozenset(name for name, f in config_fields().items() if not f.metadata["hpo"])


def literal_choices(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def shown(value) -> str:
    """A value as an error message shows it: its repr when short, else its type and size (a YAML alias bomb expands
    to gigabytes: its repr alone would exhaust the memory)."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > 40:
        return f"(a {type(value).__name__} of {len(value):,} items)"
    if isinstance(value, (list, tuple, dict, set)):  # short at the top, perhaps huge below
        return f"(a {type(value).__name__} of {len(value)} items)"
    return repr(value)


def coerce(name: str, value, source: str):
    """Check `value` against the type of field `name`; strings from the command line are parsed."""
    fields = config_fields()
    if not isinstance(name, str):  # YAML reads the keys `1:`, `true:` and `null:` as an int, a bool and None
        raise UserError(f"{source}: config key {name!r} ({type(name).__name__}) is not a field name")
    if name not in fields:
        if name in SEED_SECTIONS and isinstance(value, dict):
            inner = [seed_hint(f"{name}.{k}", False) or f"{name}.{k} has no counterpart" for k in value]
            raise UserError(f"{source}: configs are flat here: no '{name}:' section; write its keys at the top level "
                            f"({'; '.join(inner[:4])})")
        hint = seed_hint(name, False)
        raise UserError(f"{source}: unknown config key '{name}' "
                        + (f"({hint})" if hint else f"(valid: {', '.join(fields)})"))
    tp = typing.get_type_hints(Config)[name]
    choices, optional = literal_choices(tp), type(None) in typing.get_args(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if choices:
        if value not in choices:
            raise UserError(f"{source}: invalid value {shown(value)} for '{name}' (choose from {', '.join(choices)})")
        return value
    words = [w for arg in typing.get_args(tp) for w in (literal_choices(arg) or ())]  # "auto" beside a number
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    base = next(t for t in (bool, int, float, str) if t is tp or t in typing.get_args(tp))
    try:
        if base is bool:
            if isinstance(value, str):
                value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        if base in (int, float) and isinstance(value, str):
            value = float(value) if base is float else int(value)
        if base is str and not isinstance(value, str):
            raise ValueError
        return base(value)
    except (ValueError, KeyError, TypeError):
        forms = " or ".join([base.__name__, *words])
        raise UserError(f"{source}: invalid value {shown(value)} for '{name}' (expected {forms})") from None


def load_yaml_config(path: str | Path) -> dict:
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    return {k: coerce(k, v, str(path)) for k, v in raw.items()}


def make_config(**overrides) -> Config:
    """A Config from field values, type-checked, `auto` resolved, then checked as a whole: every range and
    consistency rule is here."""
    from auto_defaults import resolve_auto  # lazy: it reads this module's predicates

    cfg = resolve_auto(Config(**{k: coerce(k, v, "config") for k, v in overrides.items()}))
    validate_config(cfg)
    return cfg


def sentence_unit(cfg: Config) -> bool:
    """Whether the examples are single annotated sentences (criteria --unit sentence); every other setting reads
    whole posts, one (post, criterion) pair per criterion. The one place this is derived."""
    return cfg.task == "criteria" and cfg.unit == "sentence"


def post_encoding(cfg: Config) -> bool:
    """`--encoding post` applies to the post-level examples; criteria of single sentences always reads pairs."""
    return cfg.encoding == "post" and not sentence_unit(cfg)


def allowed_range(name: str) -> str | None:
    """The range written on a field (knob low / above / high / below) as a reader writes it: '>= 0', '> 0',
    'in [0, 1)'; None for a field without one."""
    meta = config_fields()[name].metadata
    low = ("[", ">=", meta["low"]) if meta["low"] is not None else ("(", ">", meta["above"])
    high = ("]", "<=", meta["high"]) if meta["high"] is not None else (")", "<", meta["below"])
    if low[2] is not None and high[2] is not None:
        return f"in {low[0]}{low[2]}, {high[2]}{high[0]}"
    bound = low if low[2] is not None else high
    return None if bound[2] is None else f"{bound[1]} {bound[2]}"


def check_range(name: str, value, source: str) -> None:
    """The one range check of a field's value, from its knob: every config (flags, YAML, a checkpoint's config.yaml)
    and every HPO search-space bound and choice go through it. A float must be finite first (nan passes every
    comparison, and an infinite search bound overflows Optuna's sampler in every trial)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # None, 'auto', strings: their checks are elsewhere
    if not np.isfinite(value):
        raise UserError(f"{source}: must be a finite number, got {value}")
    low, above, high, below = (config_fields()[name].metadata[k] for k in ("low", "above", "high", "below"))
    inside = (low is None or value >= low) and (above is None or value > above) and \
        (high is None or value <= high) and (below is None or value < below)
    if not inside:
        raise UserError(f"{source}: must be {allowed_range(name)}, got {value}")


def validate_config(cfg: Config) -> None:
    for name in config_fields():
        check_range(name, getattr(cfg, name), f"--{name}")
    if cfg.class_weights and cfg.criterion_weights:
        raise UserError("--class_weights and --criterion_weights: choose one (pooled or per-criterion weights)")
    for flag in ("class_weights", "criterion_weights"):
        if getattr(cfg, flag) and cfg.task == "evidence":  # it weighs the criteria loss, which evidence lacks
            raise UserError(f"--{flag}: weighs the criteria loss, of --task criteria or joint; --task evidence has "
                            "none (its sentence tags are what it learns)")
    if cfg.val_ratio + cfg.test_ratio >= 1:
        raise UserError(f"--val_ratio + --test_ratio: must leave posts to train on, got "
                        f"{cfg.val_ratio} + {cfg.test_ratio} >= 1")
    if cfg.doc_stride >= cfg.max_length // 2:
        raise UserError(f"--doc_stride: must be below max_length/2 ({cfg.max_length // 2}), got {cfg.doc_stride}")
    if cfg.tiny_hidden % cfg.tiny_heads:
        raise UserError(f"--tiny_heads: must divide --tiny_hidden {cfg.tiny_hidden}, got {cfg.tiny_heads}")
    if post_encoding(cfg) and not cfg.criterion_heads:
        raise UserError("--encoding post: needs --criterion_heads true (a window is read once for all nine criteria, "
                        "and only the per-criterion head outputs tell them apart)")
    if not cfg.output_dir.strip():
        raise UserError("--output_dir: must not be empty (it would write into the working directory)")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise UserError(f"--output_dir {cfg.output_dir}: is a file, not a folder")
    if cfg.mlflow and cfg.mlflow_system_metrics and importlib.util.find_spec("psutil") is None:
        raise UserError("--mlflow_system_metrics: needs psutil (pip install psutil, or the 'system-metrics' extra: "
                        "pip install -e '.[system-metrics]'); or run without it")
    if cfg.mlflow_register_model is not None and not cfg.mlflow_log_model:
        raise UserError(f"--mlflow_register_model {cfg.mlflow_register_model}: registers the model that "
                        "--mlflow_log_model logs, and nothing is logged without it; add --mlflow_log_model true")
    if cfg.mlflow_log_model and sentence_unit(cfg):
        raise UserError("--mlflow_log_model: a criteria model of --unit sentence cannot score posts (it classifies "
                        "annotated sentences), so it makes no servable model; train --unit post (or --task joint)")
    if cfg.lora and not pretrained(cfg):
        raise UserError("--lora: adapts a pretrained encoder, and --model tiny starts from random weights (train it in "
                        "full, or use --model minilm or a hub name)")
    if cfg.lora and importlib.util.find_spec("peft") is None:
        raise UserError("--lora: needs peft (pip install peft, or pip install -e '.[lora]')")
    if pretrained(cfg) and Path(cfg.model).is_dir() and not (Path(cfg.model) / "config.json").is_file():
        raise UserError(f"--model {cfg.model}: a folder without config.json (not a save_pretrained model folder)")


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
