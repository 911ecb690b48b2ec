"""--encoding post (one pass per post window) and evidence as a set of sentences."""
import numpy as np
import pytest
import torch

import alignment
import data
import decoding
import metrics
import models
from config import make_config
from features import collate, featurize, featurize_posts, make_loader
from models import TASKS, TaskModel

FIRST = "Everything feels hopeless and I cry every day."
SECOND = "I feel empty and sad all the time."
SLEEP = "I can’t sleep at night anymore and it’s ruining me."


def filler(n: int, offset: int = 0) -> str:
    return " ".join(f"On day {i + offset} we walked to the old store and bought {i % 9} green apples."
                    for i in range(n))


def two_sentence_post() -> tuple[str, list]:
    """A post whose DEPRESSED_MOOD evidence is two sentences with filler between them, and one SLEEP sentence."""
    text = " ".join([filler(2), FIRST, filler(3, 10), SECOND, filler(2, 20), SLEEP, filler(1, 30)])
    span = [(text.index(s), text.index(s) + len(s)) for s in (FIRST, SECOND, SLEEP)]
    examples = [{"post_id": "p", "criterion": c, "text": text, "label": int(bool(s)), "spans": s}
                for c, s in (("DEPRESSED_MOOD", span[:2]), ("SLEEP_ISSUES", span[2:]), ("FATIGUE", []))]
    return text, examples


def perfect_tags(features, pad_id, max_length):
    """What model_outputs gathers from a perfect token tagger: 5 on every evidence token, -5 elsewhere."""
    batch = collate(features, pad_id)
    tag = torch.where(batch["tag_targets"], 5.0, -5.0)
    tag = torch.nn.functional.pad(tag, (0, max_length - tag.shape[-1]), value=-1e4)
    return {"tag_logits": tag.numpy(), "feature_idx": batch["feature_idx"].numpy()}


def perfect_outputs(features, pad_id, max_length, n_best=5):
    """What model_outputs gathers from a perfect multi-gold model: 10 at every gold start/end, -10 elsewhere."""
    batch = collate(features, pad_id)
    start = torch.where(batch["start_targets"], 10.0, -10.0)
    end = torch.where(batch["end_targets"], 10.0, -10.0)
    pad = batch["attention_mask"] == 0
    pad = pad.unsqueeze(1) if start.dim() == 3 else pad
    start, end = start.masked_fill(pad, -1e4), end.masked_fill(pad, -1e4)
    mask = batch["context_mask"].unsqueeze(1).expand_as(start) if start.dim() == 3 else batch["context_mask"]
    found = decoding.window_candidates(start.flatten(0, -2), end.flatten(0, -2), mask.flatten(0, -2), 40, n_best)
    out = {k: v.unflatten(0, start.shape[:-1]).numpy() for k, v in found.items()}
    room = max_length - start.shape[-1]
    out["start_logits"] = torch.nn.functional.pad(start, (0, room), value=-1e4).numpy()
    out["end_logits"] = torch.nn.functional.pad(end, (0, room), value=-1e4).numpy()
    out["feature_idx"] = batch["feature_idx"].numpy()
    return out


def test_every_gold_span_in_a_window_is_a_target(tiny_tokenizer):
    text, examples = two_sentence_post()
    (f,) = featurize(tiny_tokenizer, examples[:1], 256, 32, windows=True)
    got = [text[f["offsets"][s, 0]:f["offsets"][e, 1]] for s, e in zip(f["starts"], f["ends"])]
    assert got == [FIRST, SECOND]
    batch = collate([f], tiny_tokenizer.pad_token_id)
    assert batch["start_targets"][0].nonzero().flatten().tolist() == f["starts"]
    assert batch["end_targets"][0].nonzero().flatten().tolist() == f["ends"]


def test_tag_targets_are_the_evidence_tokens(tiny_tokenizer):
    text, examples = two_sentence_post()
    (f,) = featurize(tiny_tokenizer, examples[:1], 256, 32, windows=True)
    tagged = [text[f["offsets"][t, 0]:f["offsets"][t, 1]] for t in f["tags"]]
    words = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(FIRST + " " + SECOND, add_special_tokens=False)
                                                 ["input_ids"])
    assert len(tagged) == len(words)  # every token of both sentences, and nothing of the filler between
    assert text[f["offsets"][f["tags"][0], 0]:].startswith(FIRST) and SECOND.endswith(tagged[-1])


def test_span_loss_with_several_golds():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    one = torch.tensor([[False, False, True, False]])
    two = torch.tensor([[False, True, True, False]])
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2]))
    torch.testing.assert_close(models.span_loss(logits, one), ce)
    p = logits.softmax(-1)[0]
    torch.testing.assert_close(models.span_loss(logits, two), -torch.log(p[1] + p[2]))  # mass on both golds


@pytest.mark.parametrize("encoding,head", [("pair", "span"), ("post", "span"), ("pair", "tag"), ("post", "tag")])
def test_two_sentence_gold_decodes_to_exactly_those_sentences(tiny_tokenizer, encoding, head):
    text, examples = two_sentence_post()
    cfg = make_config(task="evidence", encoding=encoding, max_length=64, doc_stride=16, evidence_head=head)
    features = models.featurize(cfg, tiny_tokenizer, examples[:2])
    assert len(features) > (2 if encoding == "post" else 4)  # several windows
    out = (perfect_outputs if head == "span" else perfect_tags)(features, tiny_tokenizer.pad_token_id, cfg.max_length)
    if encoding == "post":
        out, features = decoding.pair_rows(out, features)
    scores = decoding.sentence_scores(features, out, [text, text])
    golds = [decoding.sentences_of_spans(text, e["spans"]) for e in examples[:2]]
    assert [len(g) for g in golds] == [2, 1]
    threshold = decoding.tune_sentence_threshold(scores, golds, at_least_one=True)
    sets = decoding.decode_sets(scores, threshold, at_least_one=True)
    sentences = alignment.sentence_spans(text)
    assert [[text[slice(*sentences[k])] for k in sorted(s)] for s in sets] == [[FIRST, SECOND], [SLEEP]]
    m = metrics.sentence_set_metrics(golds, sets)
    assert (m["sentence_precision"], m["sentence_recall"], m["sentence_f1"], m["set_exact_match"]) == (1, 1, 1, 1)
    # the best single span can hold only one of the two sentences (or both and the filler between)
    if head == "span":
        decoded = decoding.decode_pairs(features, out, 2, [text, text])
    else:
        decoded = decoding.top_sentences(scores, sets, [text, text])
    assert decoded[0]["text"] in (FIRST, SECOND) and decoded[1]["text"] == SLEEP


def test_sentence_metrics_hand_computed():
    gold = [{0, 2}, {1}, set()]
    pred = [{0, 1}, {1}, set()]
    # tp = 1 + 1 = 2, predicted 3, gold 3: P = R = F1 = 2/3; exact sets: pairs 2 and 3
    m = metrics.sentence_set_metrics(gold, pred)
    assert m == pytest.approx({"sentence_precision": 2 / 3, "sentence_recall": 2 / 3, "sentence_f1": 2 / 3,
                               "sentence_f1_macro": (0.5 + 1 + 1) / 3, "set_exact_match": 2 / 3})
    scores = [np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.5, -np.inf]), np.array([0.3])]
    # pair 1: ranking 0 (gold), 1, 2 (gold): AP = (1/1 + 2/3) / 2 = 5/6, R = 2: top 2 hold 1 gold -> 1/2
    # pair 2: ranking 1 (gold) first: AP = 1, R-precision = 1; pair 3 has no gold and does not count
    r = metrics.ranking_metrics(gold, [np.nan_to_num(s, neginf=-1e30) for s in scores])
    assert r == pytest.approx({"sentence_map": (5 / 6 + 1) / 2, "r_precision": (0.5 + 1) / 2, "n_ranked_pairs": 2})


def test_post_featurize_targets_every_criterion(tiny_tokenizer):
    text, examples = two_sentence_post()
    features = featurize_posts(tiny_tokenizer, examples, 64, 16)
    assert len(features) > 2 and all(f["post_idx"] == 0 for f in features)
    for f in features:  # the pairs that are examples, and no other
        assert [data.SYMPTOMS[c] for c in np.flatnonzero(f["example_idxs"] >= 0)] == \
            ["DEPRESSED_MOOD", "SLEEP_ISSUES", "FATIGUE"]
        assert all(f["label"][c] == -100 for c in np.flatnonzero(f["example_idxs"] < 0))
    fatigue = data.SYMPTOMS.index("FATIGUE")
    assert all(f["label"][fatigue] == 0 and f["starts"][fatigue] == [0] for f in features)
    mood = data.SYMPTOMS.index("DEPRESSED_MOOD")
    got = {text[f["offsets"][s, 0]:f["offsets"][e, 1]] for f in features
           for s, e in zip(f["starts"][mood], f["ends"][mood]) if s}
    assert got == {FIRST, SECOND}
    assert [f["label"][mood] for f in features] == [int(f["starts"][mood][0] > 0) for f in features]


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder and counts the sequences it reads."""

    def __init__(self, encoder):
        super().__init__()
        self.inner, self.config, self.rows = encoder, encoder.config, 0

    def forward(self, input_ids, attention_mask, **kw):
        self.rows += len(input_ids)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)


@pytest.mark.parametrize("encoding", ["pair", "post"])
def test_post_encoding_reads_each_window_once(tiny_tokenizer, encoding):
    text, _ = two_sentence_post()
    other = filler(4, 50) + " " + SLEEP
    examples = [{"post_id": pid, "criterion": c, "text": t, "label": 0, "spans": []}
                for pid, t in (("a", text), ("b", other)) for c in data.SYMPTOMS]
    cfg = make_config(task="joint", encoding=encoding, max_length=64, doc_stride=16, tiny_hidden=16, tiny_heads=2)
    windows = len(featurize_posts(tiny_tokenizer, examples, 64, 16))
    features = models.featurize(cfg, tiny_tokenizer, examples)
    model = models.build_model(cfg, tiny_tokenizer)
    model.encoder = CountingEncoder(model.encoder)
    for batch in make_loader(features, 8, False, tiny_tokenizer.pad_token_id):
        model(**batch)
    pair_windows = len(featurize(tiny_tokenizer, examples, 64, 16, windows=True))
    assert model.encoder.rows == (windows if encoding == "post" else pair_windows)
    assert pair_windows >= 9 * windows  # the criterion text takes room: a pair window holds less of the post


def test_post_outputs_are_the_pair_outputs_of_each_criterion():
    """Read once, a window gives every criterion what the pair reading of that criterion gives (same tokens)."""
    from test_models import Identity

    torch.manual_seed(0)
    model = TaskModel(TASKS["joint"], Identity(8), dropout=0.0, criterion_heads=True).eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    every = model(ids, mask)
    assert every["cls_logits"].shape == (3, 9, 2) and every["start_logits"].shape == (3, 9, 7)
    for c in range(9):
        own = model(ids, mask, criterion_ids=torch.full((3,), c))
        torch.testing.assert_close(every["cls_logits"][:, c], own["cls_logits"])
        torch.testing.assert_close(every["start_logits"][:, c], own["start_logits"])
        torch.testing.assert_close(every["end_logits"][:, c], own["end_logits"])


def test_post_encoding_needs_criterion_heads():
    from config import validate_config
    from utils import UserError

    with pytest.raises(UserError, match="--encoding post: needs --criterion_heads true"):
        validate_config(make_config(task="joint", encoding="post", criterion_heads=False))
    validate_config(make_config(task="criteria", unit="sentence", criterion_heads=False))  # pairs: no need
