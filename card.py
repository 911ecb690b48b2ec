"""The model card: the README.md of a checkpoint, a Markdown template filled in with the run's model, data and
metrics, and the YAML front matter the Hugging Face hub reads (base model, datasets, licence, model-index).
"""
from __future__ import annotations

import yaml

from config import Config, pretrained, sentence_unit
from models import TASKS
from packaged_encoders import model_source

TASK_TEXT = {
    "criteria": "DSM-5 criteria classification: for each (text, criterion) pair, whether the text shows that "
                "symptom of major depression (status 1)",
    "evidence": "evidence extraction: the sentences of a post that are evidence for a given DSM-5 criterion",
    "joint": "criteria classification and evidence extraction with one model",
}

UNIT_TEXT = {
    True: "an annotated sentence. Each score says whether one sentence that annotators marked for a criterion shows "
          "it (the status of an annotation row); the model never saw a post's other sentences, so its scores are "
          "not post-level predictions, and `evaluate.py --predict` refuses it (train `--unit post` for those).",
    False: "the post. Each score says whether the whole post shows the criterion (its windows read together); "
           "`evaluate.py --predict` gives one row per (post, criterion).",
}

LOAD_ENCODER = """from transformers import AutoModel, AutoTokenizer

encoder = AutoModel.from_pretrained("checkpoints/best/encoder")  # the fine-tuned encoder alone
tokenizer = AutoTokenizer.from_pretrained("checkpoints/best/encoder")"""
LOAD_ADAPTER = """from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

base = AutoModel.from_pretrained("{base}")  # --model {model}: adapter_config.json's base_model_name_or_path
encoder = PeftModel.from_pretrained(base, "checkpoints/best/encoder")  # with its LoRA adapter
tokenizer = AutoTokenizer.from_pretrained("checkpoints/best/encoder")"""

# The checkpoint's README.md. {front_matter} is the YAML block the Hugging Face hub reads
# (https://huggingface.co/docs/hub/model-cards); {results} the metric tables of `card_metrics`.
CARD_TEMPLATE = """{front_matter}# ReDSM5 {task} model

**Not a diagnostic tool.** {task_text}, for research on annotated Reddit posts.

**Unit of its scores:** {unit}

## Model

- encoder: {encoder}; {n_params:,} parameters (`encoder/`)
- task heads: `heads.safetensors` ({heads})
- run config: `config.yaml` (max_length {max_length}, lr {lr}, seed {seed})

## Training data

- {data}
- post-level split (seed {seed}): {sizes} posts (`splits.json`)

## Results
{tested}
{results}

## How to load

```python
{load}
```

The whole model (encoder and heads): `python evaluate.py --checkpoint checkpoints/best` (metrics) or \
`--predict posts.csv` (predictions), or `checkpoint.load_checkpoint` in this repository.

## Data access

ReDSM5 is distributed by its authors under a data usage agreement. A model trained on it may memorise text of \
the posts: share this checkpoint only as that agreement allows.

## Intended use and limitations

- Research on detecting DSM-5 depression symptoms in text. Not a diagnostic tool: it must not be used to \
diagnose, screen or triage people, nor to make decisions about them.
- Trained on Reddit posts in English with one team's annotations; it will not transfer reliably to other \
platforms, languages or clinical text, and its errors are not spread evenly across symptoms.
- The metrics above are from one split of a small corpus; see the per-criterion scores.

## Licence

`license: other`: not set here. The weights derive from the base encoder (its own licence) and from ReDSM5 \
(its data usage agreement); set the licence before sharing.
"""


def card_front_matter(cfg: Config, metrics: dict) -> str:
    """The YAML block the Hugging Face hub reads (https://huggingface.co/docs/hub/model-cards), with the test metrics
    as a model-index (the hub's eval-results format)."""
    meta = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
            "tags": ["redsm5", "dsm-5", "depression", "mental-health", cfg.task],
            # not ours to choose: the base encoder's licence and ReDSM5's data usage agreement decide it
            "license": "other", "license_name": "redsm5-data-usage-agreement",
            "datasets": ["redsm5" if cfg.data_dir is not None else "redsm5-synthetic-demo"]}
    if pretrained(cfg):
        meta["base_model"] = cfg.model
    test = metrics.get("test") or {}
    scores = [{"type": k, "name": k, "value": round(float(test[k]), 4)} for k in TASKS[cfg.task].headline
              if isinstance(test.get(k), float) and test[k] == test[k]]
    if scores:
        meta["model-index"] = [{"name": f"redsm5-{cfg.task}", "results": [{
            "task": {"type": "text-classification", "name": TASK_TEXT[cfg.task].split(":")[0]},
            "dataset": {"type": meta["datasets"][0], "name": meta["datasets"][0], "split": "test"},
            "metrics": scores}]}]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def card_number(v) -> str:
    return "–" if v is None or v != v else f"{v:.4f}" if isinstance(v, float) else str(v)


def card_metrics(metrics: dict, headline: tuple) -> list[str]:
    """Markdown tables: the task's headline metrics on val, test (and test_shift), then the test (else val) F1 per
    criterion."""
    splits = [name for name in ("val", "test", "test_shift") if metrics.get(name)]
    rows = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in (k for k in headline if any(k in metrics[name] for name in splits)):
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
    """README.md of a checkpoint (CARD_TEMPLATE). `metrics`: {"val": ..., "test": ...}; test is filled in once the
    run has tested."""
    two_encoders = cfg.task == "joint" and not cfg.shared_encoder
    return CARD_TEMPLATE.format(
        front_matter=card_front_matter(cfg, metrics), task=cfg.task, task_text=TASK_TEXT[cfg.task], n_params=n_params,
        unit=UNIT_TEXT[sentence_unit(cfg)],
        encoder=(f"`tiny`: a {cfg.tiny_arch} encoder (depth {cfg.tiny_layers}, width {cfg.tiny_hidden}) trained from "
                 "scratch" if not pretrained(cfg) else f"`{cfg.model}`, "
                 + (f"frozen, with LoRA adapters of rank {cfg.lora_rank} (the base encoder is not in the checkpoint)"
                    if cfg.lora else "fine-tuned")),
        heads=("one output pair per criterion" if cfg.criterion_heads else "shared")
        + ("; a second encoder for the evidence in `span_encoder/`" if two_encoders else ""),
        max_length=cfg.max_length, lr=cfg.lr, seed=cfg.seed,
        data=(f"ReDSM5, from `{cfg.data_dir}`" if cfg.data_dir is not None else
              f"synthetic demo corpus ({cfg.demo_posts} posts, seed {cfg.demo_seed}): generated, not real posts"),
        sizes=" / ".join(f"{len(splits.get(n, []))} {n}" for n in ("train", "val", "test")),
        tested="" if metrics.get("test") else "\n(Test metrics are added once the run has tested this checkpoint.)\n",
        results="\n".join(card_metrics(metrics, TASKS[cfg.task].headline)),
        load=LOAD_ADAPTER.format(base=model_source(cfg.model), model=cfg.model) if cfg.lora else LOAD_ENCODER)
