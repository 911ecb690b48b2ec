"""Task heads: each (criterion, text) pair reads the outputs of its own criterion."""
import numpy as np
import pytest
import torch

import data
import features
from config import make_config
from models import TASKS, TaskModel, build_encoder, tiny_encoder_config
from utils import UserError


class Identity(torch.nn.Module):
    """An 'encoder' whose hidden states are its input embeddings: the heads' arithmetic is then visible."""

    def __init__(self, hidden):
        super().__init__()
        self.config = type("C", (), {"hidden_size": hidden})()
        self.emb = torch.nn.Embedding(50, hidden)

    def forward(self, input_ids, attention_mask):
        return type("O", (), {"last_hidden_state": self.emb(input_ids)})()


@pytest.mark.parametrize("task,pooling", [("criteria", "cls"), ("criteria", "max"), ("evidence", "max"),
                                          ("joint", "max")])
def test_criterion_heads_pick_the_outputs_of_each_pairs_criterion(task, pooling):
    torch.manual_seed(0)
    model = TaskModel(TASKS[task], Identity(8), dropout=0.0, criterion_heads=True, pooling=pooling).eval()
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    criteria = torch.tensor([0, 8, 3, 3])
    out = model(ids, mask, token_type_ids=torch.zeros_like(ids), criterion_ids=criteria)
    hidden = model.encoder.emb(ids)
    for row, c in enumerate(criteria.tolist()):
        if model.cls_head is not None:
            w, b = model.cls_head.weight[2 * c: 2 * c + 2], model.cls_head.bias[2 * c: 2 * c + 2]
            n_real = int(mask[row].sum())  # max pooling must not see the padding
            pooled = hidden[row, 0] if pooling == "cls" else hidden[row, :n_real].max(0).values
            torch.testing.assert_close(out["cls_logits"][row], pooled @ w.T + b)
        if model.span_head is not None:
            w, b = model.span_head.weight[2 * c: 2 * c + 2], model.span_head.bias[2 * c: 2 * c + 2]
            expected = (hidden[row] @ w.T + b).masked_fill(mask[row, :, None] == 0, -1e4)
            torch.testing.assert_close(out["start_logits"][row], expected[:, 0])
            torch.testing.assert_close(out["end_logits"][row], expected[:, 1])


def test_one_head_for_all_criteria_ignores_the_criterion_id():
    model = TaskModel(TASKS["joint"], Identity(8), dropout=0.0, criterion_heads=False).eval()
    ids = torch.randint(0, 50, (2, 5))
    a = model(ids, torch.ones_like(ids), criterion_ids=torch.tensor([0, 1]))
    b = model(ids, torch.ones_like(ids), criterion_ids=torch.tensor([7, 2]))
    assert model.cls_head.out_features == 2 and model.span_head.out_features == 2
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_tiny_encoders_run_on_tokenizer_batches(arch, tiny_tokenizer):
    """Both tiny families take the collated batch as is (ModernBERT has no token types: they are not passed)."""
    cfg = make_config(task="joint", tiny_arch=arch, tiny_hidden=16, tiny_layers=2, tiny_heads=2, max_length=64,
                      doc_stride=16)
    assert tiny_encoder_config(cfg, len(tiny_tokenizer)).model_type == arch
    model = TaskModel(TASKS["joint"], build_encoder(cfg, len(tiny_tokenizer))).eval()
    ex = [{"post_id": "p", "criterion": c, "text": "I can’t sleep at night anymore. " * 12, "label": 1,
           "spans": [(0, 31)]}
          for c in ("SLEEP_ISSUES", "FATIGUE")]
    feats = features.featurize(tiny_tokenizer, ex, max_length=64, doc_stride=16, windows=True)
    batch = features.collate(feats, tiny_tokenizer.pad_token_id)
    assert batch["criterion_ids"].tolist()[0] == data.SYMPTOMS.index("SLEEP_ISSUES")
    out = model(**batch)
    assert out["cls_logits"].shape == (len(feats), 2) and out["start_logits"].shape == batch["input_ids"].shape


@pytest.mark.parametrize("evidence_head", ["tag", "span"])
def test_each_loss_weight_scales_its_part_of_the_joint_loss(evidence_head):
    """joint loss = w_c * cross-entropy of the status + w_e * evidence loss, under either evidence head; the parts
    are computed here by hand from the logits the model returns."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    context = mask.bool().clone()
    context[:, 0] = False  # the first token is not text
    labels = torch.tensor([1, 0, 1])
    starts = torch.zeros(3, 6, dtype=torch.bool)
    starts[[0, 1, 2], [2, 1, 3]] = True
    ends = torch.zeros(3, 6, dtype=torch.bool)
    ends[[0, 1, 2], [3, 1, 3]] = True
    batch = dict(input_ids=ids, attention_mask=mask, criterion_ids=torch.tensor([0, 4, 8]), labels=labels,
                 context_mask=context, start_targets=starts, end_targets=ends, tag_targets=starts | ends)

    def loss_of(w_c, w_e):
        torch.manual_seed(1)  # the same heads every time
        model = TaskModel(TASKS["joint"], Identity(8), dropout=0.0, evidence_head=evidence_head,
                          loss_weights=(w_c, w_e)).eval()
        return model(**batch)

    out = loss_of(1.0, 1.0)
    ce = torch.nn.functional.cross_entropy(out["cls_logits"], labels)
    if evidence_head == "tag":
        bce = torch.nn.functional.binary_cross_entropy_with_logits(out["tag_logits"], (starts | ends).float(),
                                                                   reduction="none")
        gold = starts | ends  # balanced: the mean over evidence tokens and over the rest, halved
        evidence = ((bce * (context & gold)).sum() / (context & gold).sum()
                    + (bce * (context & ~gold)).sum() / (context & ~gold).sum()) / 2
    else:
        def nll(logits, gold):  # one gold position per row: plain cross-entropy
            return torch.nn.functional.cross_entropy(logits, gold.float().argmax(1))
        evidence = (nll(out["start_logits"], starts) + nll(out["end_logits"], ends)) / 2
    torch.testing.assert_close(out["loss"], ce + evidence)
    torch.testing.assert_close(loss_of(3.0, 1.0)["loss"], 3 * ce + evidence)
    torch.testing.assert_close(loss_of(1.0, 0.5)["loss"], ce + 0.5 * evidence)
    torch.testing.assert_close(loss_of(0.0, 2.0)["loss"], 2 * evidence)


def test_the_evidence_task_tag_loss_is_the_plain_mean_over_text_tokens():
    """Only joint balances its tag BCE (most of its rows have no evidence); evidence's rows all have some."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 5))
    context = torch.ones_like(ids, dtype=torch.bool)
    context[:, 0] = False
    tags = torch.zeros(2, 5, dtype=torch.bool)
    tags[0, 2], tags[1, 3:] = True, True
    model = TaskModel(TASKS["evidence"], Identity(8), dropout=0.0, evidence_head="tag").eval()
    out = model(ids, torch.ones_like(ids), criterion_ids=torch.tensor([1, 2]), context_mask=context, tag_targets=tags)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["tag_logits"], tags.float(), reduction="none")
    torch.testing.assert_close(out["loss"], bce[context].mean())


def test_criteria_loss_reads_each_rows_criterion_weights_under_pair_and_post_encoding():
    torch.manual_seed(0)
    weights = torch.rand(9, 2) * 5 + 0.1  # (criterion, class)
    model = TaskModel(TASKS["criteria"], Identity(8), dropout=0.0, class_weights=weights).eval()
    ids = torch.randint(0, 50, (4, 5))
    crit, labels = torch.tensor([8, 0, 3, 3]), torch.tensor([1, 0, 0, 1])  # pairs: one criterion a row
    out = model(ids, torch.ones_like(ids), criterion_ids=crit, labels=labels)
    logp, w = out["cls_logits"].log_softmax(-1), weights[crit, labels]
    torch.testing.assert_close(out["loss"], -(w * logp[torch.arange(4), labels]).sum() / w.sum())
    labels = torch.full((2, 9), -100)  # post windows: nine criteria a row, -100 where the pair is not an example
    labels[0, [0, 5]], labels[1, [5, 8]] = torch.tensor([1, 0]), torch.tensor([1, 1])
    out = model(ids[:2], torch.ones_like(ids[:2]), labels=labels)
    logp = out["cls_logits"].log_softmax(-1)  # (2, 9, 2)
    rows = [(0, 0, 1), (0, 5, 0), (1, 5, 1), (1, 8, 1)]
    by_hand = -sum(weights[c, y] * logp[b, c, y] for b, c, y in rows) / sum(weights[c, y] for _, c, y in rows)
    torch.testing.assert_close(out["loss"], by_hand)


def test_criteria_loss_uses_the_class_weights_and_no_targets_means_no_loss():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 5))
    labels = torch.tensor([1, 0, 0, 0])
    weights = torch.tensor([0.25, 3.0])
    model = TaskModel(TASKS["criteria"], Identity(8), dropout=0.0, class_weights=weights).eval()
    out = model(ids, torch.ones_like(ids), criterion_ids=torch.tensor([0, 1, 2, 3]), labels=labels)
    logp = out["cls_logits"].log_softmax(-1)
    by_hand = -(weights[labels] * logp[torch.arange(4), labels]).sum() / weights[labels].sum()
    torch.testing.assert_close(out["loss"], by_hand)
    assert "class_weights" not in model.state_dict()  # from the training labels, not saved with the weights
    assert "loss" not in model(ids, torch.ones_like(ids), criterion_ids=torch.tensor([0, 1, 2, 3]))


def test_criterion_weights_count_each_criterions_classes_in_the_training_inputs():
    import train

    cfg = make_config(task="criteria", unit="post", criterion_weights=True)
    pairs = [{"criterion_id": 0, "label": 1}, {"criterion_id": 0, "label": 0}, {"criterion_id": 0, "label": 0},
             {"criterion_id": 0, "label": 0}, {"criterion_id": 2, "label": 1}]
    weights = train.make_class_weights(cfg, pairs)
    assert weights.shape == (9, 2)
    torch.testing.assert_close(weights[0], torch.tensor([4 / 6, 4 / 2]))  # 3 negatives, 1 positive
    torch.testing.assert_close(weights[2], torch.tensor([1.0, 1.0]))  # a missing class counts as 1
    window = np.full(9, -100)
    window[[0, 4]] = [1, 0]  # post encoding: the nine criteria of a window, -100 where not an example
    weights = train.make_class_weights(cfg, pairs + [{"label": window}])
    torch.testing.assert_close(weights[0], torch.tensor([5 / 6, 5 / 4]))
    torch.testing.assert_close(weights[4], torch.tensor([2 / 2, 2 / 2]))
    with pytest.raises(UserError, match="--criterion_weights: weighs the criteria loss.*--task evidence has none"):
        make_config(task="evidence", criterion_weights=True)  # it was ignored without a word
    with pytest.raises(UserError, match="choose one"):
        make_config(class_weights=True, criterion_weights=True)
