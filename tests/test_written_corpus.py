"""corpora/written: the 1,056-post written corpus in ReDSM5's shape loads whole through the loader, every row aligned
exactly, with the counts its README states (issue 27), and splits by post, stratified. Fast: loading and counting,
no training."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

import alignment
import data
import splits as splitting

DIR = Path(__file__).resolve().parents[1] / "corpora" / "written"
N_POSTS, N_ROWS, N_STATUS_1, N_STATUS_0 = 1056, 2589, 1612, 977
N_NO_SYMPTOM, N_WITHOUT_ROWS = 272, 102
POSITIVE_POSTS = {"DEPRESSED_MOOD": 232, "WORTHLESSNESS": 224, "SUICIDAL_THOUGHTS": 120, "ANHEDONIA": 88,
                  "FATIGUE": 88, "SLEEP_ISSUES": 72, "COGNITIVE_ISSUES": 42, "APPETITE_CHANGE": 32, "PSYCHOMOTOR": 25}
SET_SIZES = {1: 455, 2: 253, 3: 210, 4: 5}  # 4: four or more evidence sentences
# ReDSM5's positive posts per symptom among its 1,484 posts (Bao et al.)
REDSM5 = {"DEPRESSED_MOOD": 328, "WORTHLESSNESS": 311, "SUICIDAL_THOUGHTS": 165, "FATIGUE": 124, "ANHEDONIA": 124,
          "SLEEP_ISSUES": 102, "COGNITIVE_ISSUES": 59, "APPETITE_CHANGE": 44, "PSYCHOMOTOR": 35}


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(DIR)


def test_loads_whole_and_aligns_exactly(corpus):
    rep = corpus.report
    assert (rep["posts_read"], rep["posts_kept"]) == (N_POSTS, N_POSTS)
    assert (rep["annotations_read"], rep["annotations_kept"]) == (N_ROWS, N_ROWS)
    assert rep["dropped"] == {} and rep["posts_without_annotations"] == N_WITHOUT_ROWS
    assert rep["alignment"] == {"exact": N_ROWS, "normalized": 0, "fuzzy": 0, "unaligned": 0}
    status = Counter(r["status"] for r in corpus.rows)
    assert (status[1], status[0]) == (N_STATUS_1, N_STATUS_0)


def test_every_row_is_the_sentence_its_id_names(corpus):
    spans = {pid: alignment.sentence_spans(text) for pid, text in corpus.posts.items()}
    for r in corpus.rows:
        pid, index = re.fullmatch(r"(w\d_\d{3})_(\d+)", r["sentence_id"]).groups()
        start, end = spans[pid][int(index)]
        assert pid == r["post_id"] and corpus.posts[pid][start:end] == r["sentence_text"]


def test_shape_follows_redsm5(corpus):
    pairs = corpus.positives()
    per_symptom = Counter(symptom for _, symptom in pairs)
    assert per_symptom == POSITIVE_POSTS
    for symptom, n in REDSM5.items():  # each share within 15% of ReDSM5's
        assert abs(per_symptom[symptom] / N_POSTS / (n / 1484) - 1) <= 0.15, symptom
    symptomatic = {pid for pid, _ in pairs}
    assert N_POSTS - len(symptomatic) == N_NO_SYMPTOM and 0.25 <= N_NO_SYMPTOM / N_POSTS <= 0.30
    assert 1.0 <= len(pairs) / len(symptomatic) <= 1.2
    assert Counter(min(len({(r["start"], r["end"]) for r in rows}), 4) for rows in pairs.values()) == SET_SIZES
    hard = {r["post_id"] for r in corpus.rows if r["status"] == 0}
    assert len(hard) / N_POSTS >= 0.20
    words = sorted(len(t.split()) for t in corpus.posts.values())
    assert 250 <= sum(words) / N_POSTS <= 320 and words[N_POSTS // 2] >= 150
    assert sum(w > 700 for w in words) / N_POSTS >= 0.05 and sum(w > 1500 for w in words) / N_POSTS >= 0.01


def test_splits_by_post_and_stratified(corpus):
    splits = splitting.split_posts(corpus, 42, 0.1, 0.1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 845, "val": 105, "test": 106}
    assert sorted(p for ids in splits.values() for p in ids) == sorted(corpus.posts)
    positive = {pid for pid, _ in corpus.positives()}
    for ids in splits.values():  # the share of posts with a symptom follows the corpus's (74%) in every split
        assert abs(len(positive & set(ids)) / len(ids) - len(positive) / N_POSTS) < 0.05


def test_readme_states_the_counts():
    readme = (DIR / "README.md").read_text(encoding="utf-8")
    assert f"| posts | 1,484 | {N_POSTS:,} |" in readme
    assert f"| posts without a symptom | 392 (26.4%) | {N_NO_SYMPTOM} ({N_NO_SYMPTOM / N_POSTS:.1%}) |" in readme
