"""corpora/handwritten: the hand-written ReDSM5-format corpus loads whole, aligns exactly, and has the evidence-set
sizes its README states (issue 21). Fast: loading and counting only, no training."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

import alignment
import data

DIR = Path(__file__).resolve().parents[1] / "corpora" / "handwritten"
N_POSTS, N_ROWS, N_STATUS_1, N_STATUS_0 = 120, 377, 308, 69
N_PAIRS, SET_SIZES = 175, {1: 81, 2: 60, 3: 34}  # 3: three or more evidence sentences (29 of 3, 5 of 4)
N_POSTS_WITHOUT_SYMPTOM, N_POSTS_WITHOUT_ROWS = 24, 10


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(DIR)


def test_loads_whole_and_aligns_exactly(corpus):
    rep = corpus.report
    assert (rep["posts_read"], rep["posts_kept"]) == (N_POSTS, N_POSTS)
    assert (rep["annotations_read"], rep["annotations_kept"]) == (N_ROWS, N_ROWS)
    assert rep["dropped"] == {}
    assert rep["labels_fixed"] == 0 and rep["conflicting_duplicates_resolved_to_1"] == 0
    assert rep["alignment"] == {"exact": N_ROWS, "normalized": 0, "fuzzy": 0, "unaligned": 0}
    assert sorted(corpus.posts) == [f"hw_{i:03d}" for i in range(1, N_POSTS + 1)]


def test_every_annotation_is_the_sentence_its_id_names(corpus):
    spans = {pid: alignment.sentence_spans(text) for pid, text in corpus.posts.items()}
    assert all(3 <= len(s) <= 14 for s in spans.values())
    for r in corpus.rows:
        pid, index = re.fullmatch(r"(hw_\d{3})_(\d+)", r["sentence_id"]).groups()
        assert pid == r["post_id"]
        start, end = spans[pid][int(index)]
        assert corpus.posts[pid][start:end] == r["sentence_text"]
        assert (r["start"], r["end"]) == (start, end)


def test_status_and_posts_without_symptoms(corpus):
    status = Counter(r["status"] for r in corpus.rows)
    assert (status[1], status[0]) == (N_STATUS_1, N_STATUS_0)
    with_evidence = {pid for pid, _ in corpus.positives()}
    assert len(set(corpus.posts) - with_evidence) == N_POSTS_WITHOUT_SYMPTOM
    assert corpus.report["posts_without_annotations"] == N_POSTS_WITHOUT_ROWS


def test_evidence_set_sizes_match_the_readme(corpus):
    pairs = corpus.positives()
    assert len(pairs) == N_PAIRS
    assert Counter(min(len(rows), 3) for rows in pairs.values()) == SET_SIZES
    readme = (DIR / "README.md").read_text(encoding="utf-8")
    assert f"| positive (post, symptom) pairs | {N_PAIRS} |" in readme
    assert f"1 sentence: {SET_SIZES[1]} " in readme and f"2: {SET_SIZES[2]} " in readme
    assert f"3 or more: {SET_SIZES[3]} " in readme
    # sets of 3+ are spread through the post, never one adjacent run only
    for rows in pairs.values():
        idx = sorted(int(r["sentence_id"].rsplit("_", 1)[1]) for r in rows)
        if len(idx) >= 3:
            assert idx[-1] - idx[0] > len(idx) - 1
