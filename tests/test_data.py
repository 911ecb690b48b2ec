"""data.py: the load report on a corpus with ReDSM5's quirks, alignment, splits, demo corpus, batching."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import P_DUP, P_LATIN, P_MAIN, P_NL, write_corpus, write_quirky

import alignment
import data
import demo
import features
import splits as splitting
from utils import UserError

QUIRKY_DROPPED = {
    "annotation: SPECIAL_CASE (ignored by default)": 1,
    "annotation: duplicate (post, sentence, symptom)": 2,  # one exact repeat, one conflicting status
    "annotation: empty sentence_text": 1,
    "annotation: post missing or empty": 2,  # p_missing (not in posts.csv), p_empty (empty text)
    "annotation: status not 0/1 ('')": 1,
    "annotation: status not 0/1 ('nan')": 1,
    "annotation: status not 0/1 ('yes')": 1,
    "annotation: unknown symptom label 'HAPPINESS'": 1,
    "post: duplicate post_id": 1,
    "post: empty text": 1,
}


# --------------------------------------------------------------------------- the load report

@pytest.mark.parametrize("names", data.FILE_PAIRS)
def test_load_report_counts_every_quirk(tmp_path, names):
    corpus = data.load_corpus(write_quirky(tmp_path / "d", names))
    rep = corpus.report
    assert rep["source"] == str(tmp_path / "d")
    assert (rep["posts_read"], rep["posts_kept"], rep["posts_without_annotations"]) == (7, 5, 1)
    assert (rep["annotations_read"], rep["annotations_kept"]) == (19, 9)
    assert rep["dropped"] == QUIRKY_DROPPED
    # Nothing silently dropped: kept + dropped == read, for posts and for annotations.
    dropped_ann = sum(n for why, n in rep["dropped"].items() if why.startswith("annotation:"))
    dropped_posts = sum(n for why, n in rep["dropped"].items() if why.startswith("post:"))
    assert rep["annotations_kept"] + dropped_ann == rep["annotations_read"]
    assert rep["posts_kept"] + dropped_posts == rep["posts_read"]
    assert rep["labels_fixed"] == 1
    assert rep["conflicting_duplicates_resolved_to_1"] == 1
    assert rep["undecodable_rows_kept_with_replacement_chars"] == 1
    assert rep["alignment"] == {"exact": 6, "normalized": 1, "fuzzy": 1, "unaligned": 1}
    counts = {s: (c["status_1"], c["status_0"]) for s, c in rep["per_symptom"].items()
              if c != {"status_1": 0, "status_0": 0}}
    assert counts == {"COGNITIVE_ISSUES": (1, 0), "DEPRESSED_MOOD": (1, 1), "FATIGUE": (1, 0),
                      "SLEEP_ISSUES": (3, 0), "WORTHLESSNESS": (2, 0)}
    assert set(rep["per_symptom"]) == set(data.SYMPTOMS)  # SPECIAL_CASE only when kept
    text = data.format_report(rep)
    assert "annotations: 19 read, 9 kept" in text and "labels fixed: 1" in text and "fuzzy 1, unaligned 1" in text


def test_posts_survive_bom_quotes_newlines_and_bad_bytes(quirky_dir):
    corpus = data.load_corpus(quirky_dir)
    assert corpus.posts == {"p_main": P_MAIN, "p_nl": P_NL, "p_noann": "Just saying hi to everyone.",
                            "p_dup": P_DUP, "p_latin": P_LATIN}  # first p_noann row wins over the duplicate id


def test_aligned_spans_slice_back_to_the_post(quirky_dir):
    corpus = data.load_corpus(quirky_dir)
    got = {(r["post_id"], r["sentence_id"], r["symptom"]):
           (r["status"], r["align"], corpus.posts[r["post_id"]][r["start"]:r["end"]] if r["start"] >= 0 else None)
           for r in corpus.rows}
    assert got == {
        ("p_main", "p_main_0", "SLEEP_ISSUES"): (1, "exact", "I can’t sleep at night."),
        # differs only in case and whitespace: the post's own text comes back
        ("p_main", "p_main_2", "COGNITIVE_ISSUES"): (1, "normalized", "I can’t focus at work."),
        # a paraphrase: the most similar whole sentence of the post
        ("p_main", "p_main_3", "FATIGUE"): (1, "fuzzy", "Honestly I am exhausted and have no energy every single day!"),
        ("p_main", "p_main_9", "DEPRESSED_MOOD"): (0, "unaligned", None),
        ("p_nl", "p_nl_2", "SLEEP_ISSUES"): (1, "exact", "Last line."),  # was LEEP_ISSUES, status "1.0"
        ("p_nl", "p_nl_1", "DEPRESSED_MOOD"): (1, "exact", 'She said "I give up" and left.'),
        ("p_dup", "p_dup_0", "WORTHLESSNESS"): (1, "exact", "I hate myself."),
        ("p_dup", "p_dup_1", "WORTHLESSNESS"): (1, "exact", "I feel like a failure at everything."),  # 0 vs 1 -> 1
        ("p_latin", "p_latin_1", "SLEEP_ISSUES"): (1, "exact", "I sleep too much."),
    }
    unaligned = next(r for r in corpus.rows if r["align"] == "unaligned")
    assert (unaligned["start"], unaligned["end"]) == (-1, -1)


def test_unaligned_sentences_give_no_span_targets(quirky_dir):
    corpus = data.load_corpus(quirky_dir, fuzzy_threshold=0.95)  # the paraphrase no longer aligns
    assert corpus.report["alignment"] == {"exact": 6, "normalized": 1, "fuzzy": 0, "unaligned": 2}
    examples = {(e["post_id"], e["criterion"]): e for e in data.post_examples(corpus, ["p_main"])}
    assert examples[("p_main", "FATIGUE")]["label"] == 1 and examples[("p_main", "FATIGUE")]["spans"] == []
    assert examples[("p_main", "SLEEP_ISSUES")]["spans"] == [(0, 23)]
    assert examples[("p_main", "DEPRESSED_MOOD")]["label"] == 0  # its only row is a status-0 row
    evidence = data.post_examples(corpus, ["p_main"], require_evidence=True)
    assert sorted(e["criterion"] for e in evidence) == ["COGNITIVE_ISSUES", "SLEEP_ISSUES"]
    assert data.span_usability(corpus, ["p_main"]) == {"positive_pairs": 3, "with_aligned_span": 2,
                                                       "without_span_dropped": 1}


def test_special_case_kept_when_asked(quirky_dir):
    rep = data.load_corpus(quirky_dir, include_special_case=True).report
    assert rep["annotations_kept"] == 10
    assert "annotation: SPECIAL_CASE (ignored by default)" not in rep["dropped"]
    assert rep["per_symptom"]["SPECIAL_CASE"] == {"status_1": 1, "status_0": 0}
    assert rep["alignment"]["exact"] == 7


def test_sentence_examples_and_positives(quirky_dir):
    corpus = data.load_corpus(quirky_dir)
    ex = data.sentence_examples(corpus, ["p_dup"])
    assert [(e["sentence_id"], e["criterion"], e["text"], e["label"]) for e in ex] == [
        ("p_dup_0", "WORTHLESSNESS", "I hate myself.", 1),
        ("p_dup_1", "WORTHLESSNESS", "I feel like a failure at everything.", 1)]
    pos = corpus.positives()
    assert sorted(r["sentence_id"] for r in pos[("p_dup", "WORTHLESSNESS")]) == ["p_dup_0", "p_dup_1"]
    assert ("p_main", "DEPRESSED_MOOD") not in pos  # status 0 is not evidence
    # post unit: every post x 9 criteria, label = any status-1 row
    post_ex = data.post_examples(corpus, ["p_dup", "p_noann"])
    assert len(post_ex) == 18
    assert [e["criterion"] for e in post_ex if e["label"]] == ["WORTHLESSNESS"]
    assert next(e for e in post_ex if e["label"])["spans"] == [(0, 14), (15, 51)]


def test_long_post_past_csv_field_limit(tmp_path):
    """A 50,000-word post (~300k chars, over csv's default 131,072-char field cap) with evidence at the end."""
    words = " ".join(f"word{i % 97}" for i in range(50_000))
    text = f"{words}. I have not slept properly in weeks. We ate pizza."
    folder = write_corpus(tmp_path / "long", [("long", text), ("short", "Hi.")],
                          [("long", "long_1", "I have not slept properly in weeks.", "SLEEP_ISSUES", "1"),
                           ("long", "long_2", "i have NOT slept properly\nin weeks.", "FATIGUE", "1")])
    corpus = data.load_corpus(folder)
    assert len(corpus.posts["long"]) > 131_072 and corpus.posts["long"] == text
    assert corpus.report["alignment"] == {"exact": 1, "normalized": 1, "fuzzy": 0, "unaligned": 0}
    for r in corpus.rows:
        assert text[r["start"]:r["end"]] == "I have not slept properly in weeks."
        assert r["start"] == len(words) + 2


# --------------------------------------------------------------------------- structural errors

def test_structural_errors_name_file_and_column(tmp_path):
    with pytest.raises(UserError, match="data directory not found"):
        data.load_corpus(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=r"no ReDSM5 files found \(expected posts.csv \+ annotations.csv or "
                                        r"redsm5_posts.csv \+ redsm5_annotations.csv\)"):
        data.load_corpus(tmp_path / "empty_dir")
    folder = write_corpus(tmp_path / "nocol", [("a", "x")], [("a", "a_0", "x", "FATIGUE", "1")])
    (folder / "annotations.csv").write_text("post_id,sentence_id,sentence_text,status\na,a_0,x,1\n")
    with pytest.raises(UserError, match=r"annotations.csv: missing column 'DSM5_symptom'"):
        data.load_corpus(folder)
    (folder / "posts.csv").write_text("\n\n")
    with pytest.raises(UserError, match=r"posts.csv: file is empty"):
        data.load_corpus(folder)
    (folder / "posts.csv").unlink()
    with pytest.raises(UserError, match=r"posts.csv: file not found"):
        data.load_corpus(folder)


def test_align_sentence_methods():
    post = "I can’t sleep.  Nothing   matters\nanymore. The weather was sunny on Tuesday."
    assert alignment.align_sentence("I can’t sleep.", post, 0.3) == (0, 14, "exact")
    s, e, how = alignment.align_sentence("nothing matters ANYMORE.", post, 0.3)
    assert (post[s:e], how) == ("Nothing   matters\nanymore.", "normalized")
    s, e, how = alignment.align_sentence("I can't really sleep.", post, 0.3)  # straight apostrophe: a paraphrase
    assert (post[s:e], how) == ("I can’t sleep.", "fuzzy")
    assert alignment.align_sentence("Quantum chromodynamics lectures.", post, 0.3) == (-1, -1, "unaligned")
    assert alignment.sentence_spans("One. Two!\nThree? ") == [(0, 4), (5, 9), (10, 16)]
    assert alignment.sentence_spans is alignment.sentence_spans  # decoding, evaluate, baselines import it from data


# --------------------------------------------------------------------------- splits

@pytest.fixture(scope="module")
def demo_corpus():
    return data.load_corpus(None, demo_posts=1000, demo_seed=0)


def test_split_posts_partition_sizes_and_determinism(demo_corpus):
    splits = splitting.split_posts(demo_corpus, seed=42)
    ids = [set(splits[k]) for k in ("train", "val", "test")]
    assert [len(s) for s in ids] == [800, 100, 100]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(demo_corpus.posts)
    assert splitting.split_posts(demo_corpus, seed=42) == splits
    other = splitting.split_posts(demo_corpus, seed=7)
    assert other["test"] != splits["test"] and sorted(sum(other.values(), [])) == sorted(demo_corpus.posts)
    # stratified: the share of posts without any symptom is about the same in each split
    positive_posts = {r["post_id"] for r in demo_corpus.rows if r["status"] == 1}
    share = [np.mean([p not in positive_posts for p in s]) for s in ids]
    assert max(share) - min(share) < 0.03, share


def test_split_posts_refuses_too_few_posts(tmp_path):
    corpus = data.build_corpus([{"post_id": f"p{i}", "text": "x"} for i in range(3)], [])
    with pytest.raises(UserError, match="only 3 usable posts"):
        splitting.split_posts(corpus, seed=0)


def test_kfold_splits_group_by_post(demo_corpus):
    folds = splitting.kfold_splits(demo_corpus, k=5, seed=0)
    assert len(folds) == 5
    held = [set(te) for _, te in folds]
    assert sum(len(h) for h in held) == len(demo_corpus.posts) == len(set().union(*held))  # each post held out once
    for (train, test), h in zip(folds, held):
        assert not set(train) & h and set(train) | h == set(demo_corpus.posts)
        assert len(h) == 200
    assert splitting.kfold_splits(demo_corpus, k=5, seed=0) == folds


def test_load_splits(tmp_path, quirky_dir):
    corpus = data.load_corpus(quirky_dir)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["p_main", "p_nl", "gone", "p_noann"], "val": ["p_dup"], "test": ["p_latin"]}))
    assert splitting.load_splits(path, corpus) == {"train": ["p_main", "p_nl", "p_noann"], "val": ["p_dup"],
                                              "test": ["p_latin"]}
    path.write_text(json.dumps({"train": ["p_main", "p_nl"], "val": ["p_dup"], "test": ["p_latin"]}))
    with pytest.raises(UserError, match=r"splits.json: 1 of the corpus' 5 posts are in no split \(first: 'p_noann'\)"):
        splitting.load_splits(path, corpus)
    path.write_text(json.dumps({"train": ["p_main", "p_nl"], "val": ["p_dup"], "test": ["p_nl"]}))
    with pytest.raises(UserError, match=r"splits.json: post 'p_nl' is in both 'train' and 'test'"):
        splitting.load_splits(path, corpus)
    path.write_text(json.dumps({"train": ["p_main"], "val": []}))
    with pytest.raises(UserError, match="expected lists 'train', 'val' and 'test'"):
        splitting.load_splits(path, corpus)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        splitting.load_splits(path, corpus)
    path.write_text(json.dumps({"train": ["p_main"], "val": ["p_dup"], "test": []}))  # was an IndexError
    with pytest.raises(UserError, match="splits.json: 'test' is empty"):
        splitting.load_splits(path, corpus)
    path.write_text(json.dumps({"train": ["p_main"], "val": [["p_dup"]], "test": ["p_nl"]}))  # was a TypeError
    with pytest.raises(UserError, match=r"splits.json: 'val' holds \['p_dup'\], not a post id"):
        splitting.load_splits(path, corpus)


# --------------------------------------------------------------------------- demo corpus

def test_make_demo_is_deterministic_and_self_consistent():
    posts, anns = demo.make_demo(300, seed=3)
    assert (posts, anns) == demo.make_demo(300, seed=3)
    assert demo.make_demo(300, seed=4)[0] != posts
    assert len(posts) == 300 and len({p["post_id"] for p in posts}) == 300
    text = {p["post_id"]: p["text"] for p in posts}
    for a in anns:
        assert text[a["post_id"]].count(a["sentence_text"]) == 1, a  # found, and unambiguously
        assert a["sentence_id"].startswith(a["post_id"] + "_") and a["status"] in (0, 1)
        assert a["DSM5_symptom"] in data.SYMPTOMS
    with_symptom = {a["post_id"] for a in anns if a["status"] == 1}
    assert 0.15 < 1 - len(with_symptom) / 300 < 0.35  # about a quarter of posts have no symptom
    assert any(a["status"] == 0 for a in anns)  # hard negatives exist
    shift_posts, shift_anns = demo.make_demo(300, seed=3, part="shift")
    assert (shift_posts, shift_anns) == demo.make_demo(300, seed=3, part="shift") and shift_posts != posts
    shift_text = {p["post_id"]: p["text"] for p in shift_posts}
    assert all(shift_text[a["post_id"]].count(a["sentence_text"]) == 1 for a in shift_anns)
    corpus = data.build_corpus(posts, [{k: str(v) for k, v in a.items()} for a in anns])
    assert corpus.report["dropped"] == {} and corpus.report["alignment"]["exact"] == len(anns)


def _forms(entries) -> set[str]:
    """Every written form of some cores or denials: present, past, and the third person after its subject."""
    out = set()
    for entry in entries:
        for present, third, past in entry:
            tail = third.split("{who}", 1)[1]
            out |= {present.lower(), past.lower()} | {tail.format(**f).lower() for f in demo.PRONOUNS.values()}
    return out


def test_held_out_phrasing_never_in_main_corpus_and_only_it_in_shift():
    main, shift = demo.pieces("main"), demo.pieces("shift")
    main_text = "\n".join(p["text"] for p in demo.make_demo(1000, 0)[0]).lower()
    for sym, s in shift["symptoms"].items():
        held = [c.lower() for entry in s["cores"] + s["denials"] for c, _, _ in entry]
        held += [t.lower() for t in s["topics"]]
        assert len(s["cores"]) == 3 and held, sym  # every 4th of 12 cores
        leaked = [h for h in held if h in main_text]
        assert not leaked, (sym, leaked)
    assert not [r for r, _ in shift["relatives"] if r in main_text]  # "my dad", "my coworker"
    posts, anns = demo.make_demo(300, 0, "shift")
    assert {p["post_id"][:6] for p in posts} == {"shift_"}
    for a in anns:  # every annotated sentence is written from held-out pieces of its symptom only
        s, text = shift["symptoms"][a["DSM5_symptom"]], a["sentence_text"].lower()
        assert any(f in text for f in _forms(s["cores"] + s["denials"]) | {t.lower() for t in s["topics"]}), a
        m = main["symptoms"][a["DSM5_symptom"]]
        assert not any(c.lower() in text for entry in m["cores"] + m["denials"] for c, _, _ in entry), a
    assert not set(demo.split_part(["", "a", "b", "c", "d"], "main")) & set(demo.split_part(["a", "b", "c", "d"],
                                                                                              "shift"))


def test_demo_hard_negatives_of_every_kind():
    pc = demo.pieces("main")
    posts, anns = demo.make_demo(1000, 0)
    why = Counter(a["explanation"] for a in anns if a["status"] == 0)
    denial_why = {w for s in pc["symptoms"].values() for w in s["negative_explanations"]}
    counts = {kind: why[text] for kind, text in pc["kind_explanations"].items()}
    counts["denial"] = sum(n for w, n in why.items() if w in denial_why)
    assert set(counts) == {"negation", "other_person", "past", "topic", "denial"}
    assert min(counts.values()) > 50, counts
    shown = {(a["post_id"], a["DSM5_symptom"]) for a in anns if a["status"] == 1}
    assert not any((a["post_id"], a["DSM5_symptom"]) in shown for a in anns if a["status"] == 0)  # labels stay clean
    pairs = Counter((a["post_id"], a["DSM5_symptom"]) for a in anns if a["status"] == 1)
    assert 0.10 < sum(n >= 2 for n in pairs.values()) / len(pairs) < 0.20  # ~15% with two evidence sentences
    # the same words on both sides: no opener, tail or frame word occurs in one label only
    first = Counter((a["sentence_text"].split()[0], a["status"]) for a in anns)
    assert first[("Honestly,", 1)] > 20 and first[("Honestly,", 0)] > 10


def test_demo_third_person_and_past_forms():
    assert demo.conjugate("I can't sleep because I'm tired", "third") == "{who} can't sleep because {he}'s tired"
    assert demo.conjugate("I cry until I fall asleep", "third") == "{who} cries until {he} falls asleep"
    assert demo.conjugate("I barely eat at my desk", "third") == "{who} barely eats at {his} desk"
    assert demo.conjugate("I keep blaming myself", "past") == "I kept blaming myself"
    assert demo.conjugate("I'm tired and I carry it", "past") == "I was tired and I carried it"
    assert demo.expand("I (can't|cannot) sleep (now|)") == ["I can't sleep now", "I can't sleep ", "I cannot sleep now",
                                                           "I cannot sleep "]


def test_write_demo_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        data.write_demo(tmp_path / name, 200, 7, shift_posts=50)
    for f in ("posts.csv", "annotations.csv", "shift/posts.csv", "shift/annotations.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    data.write_demo(tmp_path / "c", 200, 8, shift_posts=50)
    assert (tmp_path / "c/shift/posts.csv").read_bytes() != (tmp_path / "a/shift/posts.csv").read_bytes()


def test_demo_has_evidence_past_512_tokens(demo_corpus):
    # whitespace words underestimate WordPiece tokens: > 512 words is surely > 512 tokens
    deep = [r for r in demo_corpus.rows
            if r["status"] == 1 and len(demo_corpus.posts[r["post_id"]][:r["start"]].split()) > 512]
    assert deep


# --------------------------------------------------------------------------- batching

def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=203)
    sampler = features.LengthGroupedBatches(lengths, batch_size=8, shuffle=True, seed=1, group=4)
    assert len(sampler) == 26  # ceil(203 / 8)
    epoch0 = list(sampler)
    assert len(epoch0) == 26
    assert sorted(i for b in epoch0 for i in b) == list(range(203))  # each index exactly once
    assert list(sampler) == epoch0  # same seed, same epoch: same order
    assert list(features.LengthGroupedBatches(lengths, 8, True, seed=1, group=4)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(203))
    # grouping by length pads less than plain random batches
    padded = sum(len(b) * lengths[b].max() for b in epoch0)
    perm = rng.permutation(203)
    random_padded = sum(len(b) * lengths[b].max() for b in np.array_split(perm, 26))
    assert padded < random_padded

    evaluation = list(features.LengthGroupedBatches(lengths, 8, shuffle=False))
    order = [i for b in evaluation for i in b]
    assert sorted(order) == list(range(203))
    assert all(lengths[a] >= lengths[b] for a, b in zip(order, order[1:]))  # longest first


def test_collate_pads_each_batch_to_its_longest():
    f1 = {"idx": 4, "input_ids": np.array([2, 10, 3], dtype=np.int32),
          "token_type_ids": np.array([0, 0, 0], dtype=np.int8),
          "label": 1, "offsets": np.array([[-1, -1], [0, 5], [-1, -1]], dtype=np.int32), "starts": [1], "ends": [1],
          "tags": [1]}
    f2 = {"idx": 9, "input_ids": np.array([2, 11, 3, 12, 3], dtype=np.int32),
          "token_type_ids": np.array([0, 0, 0, 1, 1], dtype=np.int8), "label": 0,
          "offsets": np.array([[-1, -1], [-1, -1], [-1, -1], [0, 4], [-1, -1]], dtype=np.int32), "starts": [0],
          "ends": [0], "tags": []}
    batch = features.collate([f1, f2], pad_id=7)
    assert batch["input_ids"].tolist() == [[2, 10, 3, 7, 7], [2, 11, 3, 12, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["context_mask"].tolist() == [[False, True, False, False, False], [False, False, False, True, False]]
    assert batch["labels"].tolist() == [1, 0] and batch["feature_idx"].tolist() == [4, 9]
    one_hot = [[False, True, False, False, False], [True, False, False, False, False]]  # gold 1, and the null 0
    assert batch["start_targets"].tolist() == one_hot and batch["end_targets"].tolist() == one_hot
    assert batch["tag_targets"].tolist() == [[False, True, False, False, False], [False] * 5]
    assert batch["input_ids"].dtype == torch.long
    narrow = features.collate([f1], pad_id=7)  # a batch of short features stays short
    assert narrow["input_ids"].shape == (1, 3) and narrow["start_targets"].shape == (1, 3)


def test_featurize_sentence_unit_truncates_text(tiny_tokenizer):
    ex = [{"criterion": "FATIGUE", "text": "I can’t sleep at night. " * 40, "label": 1, "spans": []},
          {"criterion": "ANHEDONIA", "text": "Hi.", "label": 0, "spans": []}]
    feats = features.featurize(tiny_tokenizer, ex, max_length=48, doc_stride=0, windows=False)
    assert [len(f["input_ids"]) for f in feats][0] == 48 and len(feats) == 2
    assert [f["label"] for f in feats] == [1, 0] and [f["example_idx"] for f in feats] == [0, 1]
    assert "offsets" not in feats[0]
    criterion = tiny_tokenizer(data.CRITERIA["ANHEDONIA"], add_special_tokens=False)["input_ids"]
    assert feats[1]["input_ids"].tolist()[1 : 1 + len(criterion)] == criterion  # criterion first, then the text


def test_featurize_max_length_too_small_is_a_user_error(tiny_tokenizer):
    ex = [{"criterion": "SUICIDAL_THOUGHTS", "text": "I can’t sleep at night. " * 40, "label": 1, "spans": []}]
    n = len(tiny_tokenizer(data.CRITERIA["SUICIDAL_THOUGHTS"], add_special_tokens=False)["input_ids"])
    # Without the check the tokenizer raises a bare Exception (no room for text) or panics (stride >= room).
    with pytest.raises(UserError, match="--max_length"):
        features.featurize(tiny_tokenizer, ex, max_length=n + 3, doc_stride=0, windows=False)  # [CLS] q [SEP] [SEP]
    with pytest.raises(UserError, match="--max_length"):
        features.featurize(tiny_tokenizer, ex, max_length=n + 3 + 8, doc_stride=8, windows=True)
    (fit,) = features.featurize(tiny_tokenizer, ex, max_length=n + 3 + 1, doc_stride=0, windows=False)
    assert len(fit["input_ids"]) == n + 4
    assert len(features.featurize(tiny_tokenizer, ex, max_length=n + 3 + 9, doc_stride=8, windows=True)) > 1


def test_windows_cover_every_text_or_fail_loudly(tiny_tokenizer):
    text = " ".join(f"On day {i} we walked to the old store and bought {i} green apples." for i in range(40))
    ex = [{"post_id": "p_long", "criterion": "FATIGUE", "text": text, "label": 0, "spans": []},
          {"post_id": "p_short", "criterion": "FATIGUE", "text": "Hi.", "label": 0, "spans": []}]
    feats = features.featurize(tiny_tokenizer, ex, max_length=64, doc_stride=16, windows=True)
    long_windows = [f for f in feats if f["example_idx"] == 0]
    assert len(long_windows) > 2  # the last window reaches the text's last character ('.')
    assert max(int(f["offsets"][:, 1].max()) for f in long_windows) == len(text)
    # What tokenizers 0.23.1-0.23.2 return: only the first two windows of a long text.
    kept = {id(f) for f in long_windows[:2]}
    torn = [f for f in feats if f["example_idx"] == 1 or id(f) in kept]
    with pytest.raises(UserError, match=r"post p_long: its windows stop at character \d+ of %d" % len(text)):
        features.check_windows_cover_texts(tiny_tokenizer, ex, torn)


def test_invisible_text_is_empty_and_blank_sentence_ids_are_not_duplicates(tmp_path):
    """A post of zero-width spaces gives a tokenizer no token (it crashed featurize): it is an empty text.
    Annotations without a sentence_id are told apart by their text, not merged as one duplicate."""
    posts = [["p1", "\u200b\u200b \u200b"], ["p2", "I cannot sleep. I feel slow. I eat little."]]
    annotations = [["p2", "", "I cannot sleep.", "SLEEP_ISSUES", "1"], ["p2", "", "I feel slow.", "SLEEP_ISSUES", "0"],
                   ["p2", " ", "I eat little.", "SLEEP_ISSUES", "0"],
                   ["p2", "", "I cannot  sleep.", "SLEEP_ISSUES", "0"]]
    corpus = data.load_corpus(write_corpus(tmp_path / "d", posts, annotations))
    assert list(corpus.posts) == ["p2"]
    assert corpus.report["dropped"] == {"post: empty text": 1, "annotation: duplicate (post, sentence, symptom)": 1}
    assert corpus.report["conflicting_duplicates_resolved_to_1"] == 1  # "I cannot  sleep." is the same sentence
    assert sorted(r["sentence_text"] for r in corpus.rows) == ["I cannot sleep.", "I eat little.",
                                                                       "I feel slow."]


def test_a_text_the_tokenizer_reads_as_nothing_is_a_user_error(tiny_tokenizer):
    """It was an IndexError in featurize (a window with no text token)."""
    ex = [{"post_id": "p9", "criterion": "SLEEP_ISSUES", "text": "\u200b", "label": 0, "spans": []}]
    with pytest.raises(UserError, match="post p9: the tokenizer gives its text no token"):
        features.featurize(tiny_tokenizer, ex, 96, 16, windows=True)


def test_a_rewritten_training_corpus_is_never_scored_as_new_posts(tmp_path):
    """`data.py --make_demo` with the training seed writes the training corpus as CSVs: its digest differs from the
    built-in demo's (CSV bytes against JSON rows), but the posts the model trained or validated on are left out, so
    what is scored is the run's own test split."""
    import evaluate
    from config import make_config

    cfg = make_config(demo_posts=60, demo_seed=0, demo_shift_posts=0)
    corpus = data.load_corpus_from_config(cfg)
    splits = splitting.split_posts(corpus, cfg.seed, cfg.val_ratio, cfg.test_ratio)
    ckpt = tmp_path / "best"
    ckpt.mkdir()
    (ckpt / "splits.json").write_text(json.dumps(splits))
    data.write_demo(tmp_path / "copy", 60, 0)
    trained_on = data.data_sha256(cfg)
    assert data.data_sha256(make_config(data_dir=str(tmp_path / "copy"))) != trained_on  # the digest cannot tell
    _, post_ids, scored = evaluate.split_posts_of(cfg, ckpt, "test", tmp_path / "copy", trained_on)
    assert (sorted(post_ids), scored) == (sorted(splits["test"]), "unseen")
    (ckpt / "splits.json").write_text(json.dumps({**splits, "train": splits["train"] + splits["test"]}))
    with pytest.raises(data.UserError, match="every post has an id the model trained or validated on"):
        evaluate.split_posts_of(cfg, ckpt, "test", tmp_path / "copy", trained_on)
