"""checkpoints/best in the Hugging Face layout, its model card, and what a run leaves in the MLflow store."""
import hashlib
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_quirky

import checkpoint
import data
import demo
import models
import runner
import tracking
import utils
from config import make_config
from tracking import Tracker
from utils import UserError

SMALL = dict(demo_posts=150, tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_vocab=1000, max_length=96,
             doc_stride=24, batch_size=16, eval_batch_size=32, log_every=5, epochs=1, max_steps=6)
ARGV = ["train.py", "--run_name", "two words", "--max_steps", "6"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tracked criteria run (--unit post: a model that scores posts), with the system-metrics sampler (every
    0.2 s) and the checkpoint logged."""
    tmp = tmp_path_factory.mktemp("hf")
    cfg = make_config(**SMALL, unit="post", output_dir=str(tmp / "run"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                      mlflow_system_metrics=True, mlflow_log_model=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        mp.setattr(sys, "argv", ARGV)
        results = runner.run(cfg)
    return cfg, results, Path(cfg.output_dir)


def client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.tracking_uri)


def test_encoder_loads_with_automodel_and_gives_our_hidden_states(trained):
    from transformers import AutoModel, AutoTokenizer

    cfg, _, out = trained
    best = out / "checkpoints" / "best"
    ours, our_tokenizer, _, _ = checkpoint.load_checkpoint(best)
    encoder, tokenizer = AutoModel.from_pretrained(best / "encoder"), AutoTokenizer.from_pretrained(best / "encoder")
    assert type(encoder).__name__ == "ModernBertModel" and encoder.config.model_type == "modernbert"
    pair = (data.CRITERIA["SLEEP_ISSUES"], "I can’t sleep at night, I lie awake until 4.")
    inputs = tokenizer(*pair, return_tensors="pt")
    assert inputs["input_ids"].tolist() == our_tokenizer(*pair, return_tensors="pt")["input_ids"].tolist()
    mask = inputs["attention_mask"]
    with torch.no_grad():
        theirs = encoder.eval()(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        mine = ours.encoder(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
    assert theirs.shape == (1, mask.shape[1], cfg.tiny_hidden) and torch.equal(theirs, mine)
    # the trained weights, not a fresh init: they differ from an untrained encoder of the same config
    fresh = AutoModel.from_config(encoder.config)
    assert not torch.equal(fresh.embeddings.tok_embeddings.weight, encoder.embeddings.tok_embeddings.weight)


def test_bert_checkpoint_without_its_pooler_loads_with_automodel(tiny_tokenizer, tmp_path):
    """Our BERT encoder has its pooler dropped: AutoModel gives it a new one and the hidden states are ours."""
    from transformers import AutoModel

    cfg = make_config(task="criteria", tiny_arch="bert", tiny_hidden=16, tiny_layers=1, tiny_heads=1, max_length=64,
                      doc_stride=16)
    model = models.build_model(cfg, tiny_tokenizer).eval()
    checkpoint.save_checkpoint(model, tiny_tokenizer, cfg, tmp_path / "best")
    encoder, info = AutoModel.from_pretrained(tmp_path / "best" / "encoder", output_loading_info=True)
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"} and not info["unexpected_keys"]
    ids = torch.tensor([tiny_tokenizer("I can’t sleep at night.")["input_ids"]])
    with torch.no_grad():
        theirs, mine = encoder.eval()(input_ids=ids).last_hidden_state, model.encoder(input_ids=ids).last_hidden_state
    assert torch.equal(theirs, mine)
    loaded = checkpoint.load_checkpoint(tmp_path / "best")[0]
    assert loaded.encoder.pooler is None  # our loader drops it again: the weights are exactly the saved ones
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_sharded_save_path_splits_the_full_state_dict_by_prefix(tiny_tokenizer, tmp_path):
    """The FSDP path: save_checkpoint writes the full state dict it is given (accelerator.get_state_dict), split
    into encoder/, span_encoder/ and heads.safetensors, not the (sharded) model's own tensors."""
    from safetensors.torch import load_file

    cfg = make_config(task="joint", shared_encoder=False, tiny_hidden=16, tiny_layers=1, tiny_heads=1,
                      max_length=64, doc_stride=16)
    model = models.build_model(cfg, tiny_tokenizer)
    full = {k: torch.full_like(v, i + 0.5) if v.is_floating_point() else v
            for i, (k, v) in enumerate(model.state_dict().items())}
    checkpoint.save_checkpoint(model, tiny_tokenizer, cfg, tmp_path / "best", state_dict=full)
    heads = load_file(tmp_path / "best" / "heads.safetensors")
    assert sorted(heads) == ["cls_head.bias", "cls_head.weight", "span_head.bias", "span_head.weight"]
    for prefix in ("encoder", "span_encoder"):
        saved = load_file(tmp_path / "best" / prefix / "model.safetensors")
        assert {f"{prefix}.{k}" for k in saved} == {k for k in full if k.startswith(prefix + ".")}
        assert all(torch.equal(v, full[f"{prefix}.{k}"]) for k, v in saved.items())
    loaded = checkpoint.load_checkpoint(tmp_path / "best")[0]
    assert all(torch.equal(v, full[k]) for k, v in loaded.state_dict().items())


def test_model_card(trained):
    cfg, results, out = trained
    text = (out / "checkpoints" / "best" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["license"] == "other" and "criteria" in meta["tags"]
    assert body.startswith("# ReDSM5 criteria model") and "**Not a diagnostic tool.**" in body
    assert "synthetic demo corpus (150 posts, seed 0)" in body and "data usage agreement" in body
    assert "**Unit of its scores:** the post." in body  # --unit post; a sentence-unit card says so (test_card_unit)
    assert 'AutoModel.from_pretrained("checkpoints/best/encoder")' in body and "evaluate.py --checkpoint" in body
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert f"| f1_macro | {results['val']['f1_macro']:.4f} | {test['f1_macro']:.4f} |" in body
    assert f"| n | {results['val']['n']} | {test['n']} |" in body
    assert f"| {next(iter(test['per_criterion_f1']))} | {next(iter(test['per_criterion_f1'].values())):.4f} |" in body
    splits = json.loads((out / "splits.json").read_text())
    assert f"{len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test posts" in body
    n_params = sum(p.numel() for p in checkpoint.load_checkpoint(out / "checkpoints" / "best")[0].encoder.parameters())
    assert f"{n_params:,} parameters" in body


def test_mlflow_run_has_the_dataset_per_criterion_metrics_and_description(trained):
    cfg, _, out = trained
    run_id = json.loads((out / "run_stats.json").read_text())["mlflow_run_id"]
    run = client(cfg).get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    posts, annotations = demo.make_demo(150, 0)
    digest = hashlib.sha256(json.dumps([150, 0, posts, annotations], sort_keys=True).encode()).hexdigest()
    assert dataset_input.dataset.name == "demo-150-seed0" and dataset_input.dataset.digest == digest[:16]
    assert json.loads(dataset_input.dataset.source) == {"tags": {"mlflow.source.name": "demo:n_posts=150,seed=0"}}
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training", "sha256": digest}
    test = json.loads((out / "metrics.json").read_text())["test"]
    metrics = run.data.metrics
    assert {f"4_test/f1/{c}": v for c, v in test["per_criterion_f1"].items()} == \
        {k: v for k, v in metrics.items() if k.startswith("4_test/f1/")}
    assert metrics["4_test/f1_macro"] == test["f1_macro"] and metrics["3_best_val/f1_macro"] > 0
    # keyed by prefix, so that MLflow's chart sections group them; the long tail stays in metrics.json
    sections = sorted({k.split("/")[0] for k in metrics if not k.startswith("system/")})  # the UI's order
    assert sections == ["1_train", "2_val", "3_best_val", "4_test", "5_test_shift"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()  # the names the README documents
    named = {"1_train/loss", "1_train/lr", "4_test/f1/<CRITERION>"} | {f"{s}/" for s in sections[1:]}
    assert all(f"`{name}`" in readme for name in named)
    assert {"1_train/loss", "1_train/lr", "4_test/f1/FATIGUE"} <= set(metrics) and \
        all(any(k.startswith(f"{s}/") for k in metrics) for s in sections)
    assert len([k for k in metrics if not k.startswith("system/")]) <= 60  # 82 before, in one alphabetical list
    artifacts = {a.path for a in client(cfg).list_artifacts(run_id, "figures")}
    assert {"figures/training.png", "figures/confusion_test.png", "figures/pr_roc.png",
            "figures/per_criterion_f1.png"} <= artifacts
    experiment = client(cfg).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith(Path(cfg.tracking_uri[len("sqlite:///"):]).parent.as_uri())
    assert run.data.tags["mlflow.note.content"] == f"`{shlex.join(ARGV)}`"  # "`train.py ... 'two words' ...`"
    assert run.data.tags["mlflow.source.name"] == "train.py"
    assert run.data.tags["mlflow.source.git.commit"] == utils.code_version()  # the code that ran
    assert any(k.startswith("system/cpu_utilization") for k in metrics)  # --mlflow_system_metrics
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")  # --mlflow_log_model: a pyfunc model of the run
    assert "python_function" in info.flavors and info.run_id == run_id
    assert "per_criterion_f1.json" in {a.path for a in client(cfg).list_artifacts(run_id)}


def test_dataset_digest_tells_data_apart(tmp_path):
    """A data folder's digest is the sha256 of its two files' sha256s: one changed byte, another digest."""
    folder = write_quirky(tmp_path / "d")
    cfg = make_config(data_dir=str(folder))
    report = data.load_corpus_from_config(cfg).report
    expected = hashlib.sha256(b"".join(hashlib.sha256((folder / f).read_bytes()).digest()
                                       for f in ("posts.csv", "annotations.csv"))).hexdigest()
    first = tracking.dataset_input(cfg, report, data.data_sha256(cfg))
    assert first["digest"] == expected[:16] and first["source"] == {"uri": str(folder.resolve())}
    assert first["name"] == "d" and first["profile"] == {"posts": 5, "annotations": 9}
    (folder / "annotations.csv").write_bytes((folder / "annotations.csv").read_bytes().replace(b"comma.", b"comma!"))
    assert tracking.dataset_input(cfg, report, data.data_sha256(cfg))["digest"] != first["digest"]
    demo = [data.data_sha256(make_config(demo_posts=60, demo_seed=s)) for s in (0, 0, 1)]
    assert demo[0] == demo[1] != demo[2]


def test_dataset_inputs_in_the_store_differ_between_data(tmp_path):
    cfg = make_config(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", output_dir=str(tmp_path / "x"))
    ids = []
    for seed in (0, 1):
        with Tracker(cfg, True) as tracker:
            demo = make_config(demo_posts=40, demo_seed=seed)
            tracker.log_dataset(**tracking.dataset_input(demo, {"posts_kept": 40, "annotations_kept": 1},
                                                         data.data_sha256(demo)))
            ids.append(tracker.run_id)
    names, digests = zip(*[(d.dataset.name, d.dataset.digest) for i in ids
                           for d in client(cfg).get_run(i).inputs.dataset_inputs])
    assert names == ("demo-40-seed0", "demo-40-seed1") and digests[0] != digests[1]


def test_system_metrics_without_psutil_is_a_user_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psutil" else real(name, *a))
    with pytest.raises(UserError, match="--mlflow_system_metrics: needs psutil"):
        make_config(mlflow_system_metrics=True)
    assert make_config(mlflow_system_metrics=True, mlflow=False).mlflow_system_metrics  # nothing to sample into


def test_the_checkpoint_describes_itself(tmp_path):
    """model_max_length is the run's max_length, the head rows of every criterion and its description are saved, and
    the card's front matter parses as a Hugging Face ModelCard with the test metrics as eval results."""
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from transformers import AutoTokenizer

    import data

    cfg = make_config(task="joint", demo_posts=40, tiny_hidden=16, tiny_layers=1, tiny_heads=1, tiny_vocab=300,
                      max_length=96, doc_stride=16, batch_size=8, demo_shift_posts=0, epochs=1, max_steps=2,
                      mlflow=False, output_dir=str(tmp_path / "run"))
    results = runner.run(cfg)
    best = tmp_path / "run" / "checkpoints" / "best"
    tokenizer = AutoTokenizer.from_pretrained(best / "encoder")
    assert tokenizer.model_max_length == 96
    assert len(tokenizer("word " * 3000, truncation=True)["input_ids"]) == 96
    labels = json.loads((best / "checkpoint.json").read_text())["labels"]
    with safe_open(str(best / "heads.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["labels"]) == labels
        assert f.get_tensor("cls_head.weight").shape[0] == 2 * len(labels["criteria"])
    assert [c["name"] for c in labels["criteria"]] == data.SYMPTOMS
    fatigue = labels["criteria"][data.SYMPTOMS.index("FATIGUE")]
    assert fatigue["cls_head_rows"] == [10, 11] and fatigue["evidence_head_rows"] == [5]  # tag head: one row
    assert fatigue["description"] == data.CRITERIA["FATIGUE"]
    card = ModelCard.load(best / "README.md")
    assert card.data.license == "other" and card.data.license_name == "redsm5-data-usage-agreement"
    assert card.data.datasets == ["redsm5-synthetic-demo"]
    scores = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert scores["combined"] == round(results["test"]["combined"], 4)
    assert scores["f1_macro"] == round(results["test"]["f1_macro"], 4)


def test_card_unit_says_what_a_score_is():
    import card

    sentence, post = (card.model_card(make_config(unit=u), {}, 0, {}) for u in ("sentence", "post"))
    assert "**Unit of its scores:** an annotated sentence." in sentence and "not post-level predictions" in sentence
    assert "**Unit of its scores:** the post." in post
