"""The SYNTHETIC demo corpus: template text in the ReDSM5 format, not real Reddit data.

    python data.py --make_demo DIR [--n_posts N] [--seed S]   # write it as posts.csv + annotations.csv

It is the default data of every command, so that the whole pipeline runs offline: a pure function
of (n_posts, seed), generated in well under a second, scaling to 100k posts for benchmarks. Its
phrases live in configs/demo_corpus.yaml. This module imports nothing of ours.
"""
from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

DEMO_PHRASES = Path(__file__).resolve().parent / "configs" / "demo_corpus.yaml"
POST_COLUMNS = ["post_id", "text"]
ANNOTATION_COLUMNS = ["post_id", "sentence_id", "sentence_text", "DSM5_symptom", "status", "explanation"]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def load_phrases(path: Path = DEMO_PHRASES) -> dict:
    """The phrase lists, with the opener and tail lists of evidence and of hard negatives put together,
    and every filler sentence up front (one rng.sample per post is fast and distinct by construction)."""
    import yaml

    ph = yaml.safe_load(path.read_text())
    ph["ev_openers"] = ph["shared_openers"] + ph["evidence_openers"]
    ph["neg_openers"] = ph["shared_openers"] + ph["negative_openers"]
    ph["ev_tails"] = ph["shared_tails"] + ph["evidence_tails"]
    ph["neg_tails"] = ph["shared_tails"] + ph["negative_tails"]
    fillers = [_cap(o + c + t + p) for o, c, t, p in itertools.product(
        ph["filler_openers"], ph["filler_clauses"], ph["filler_tails"], ".!")]
    ph["filler_pool"] = list(dict.fromkeys(fillers)) + ph["filler_questions"]
    return ph


def _sentence(rng: random.Random, openers: list[str], core: str, tails: list[str]) -> str:
    return _cap(rng.choice(openers) + core + rng.choice(tails) + rng.choice("...!"))


def _post_symptoms(rng: random.Random, ph: dict) -> list[str]:
    """The symptoms a post shows: none for about a quarter of posts, else 1-4, weighted by prevalence."""
    positives, names = [], list(ph["symptoms"])
    if rng.random() >= 0.25:
        pool, weights = names[:], [ph["weights"][s] for s in names]
        for _ in range(rng.choices((1, 2, 3, 4), weights=(45, 30, 17, 8))[0]):
            i = rng.choices(range(len(pool)), weights=weights)[0]
            positives.append(pool.pop(i))
            weights.pop(i)
    return positives


def _annotated_sentences(rng: random.Random, ph: dict, positives: list[str]) -> list[tuple]:
    """(sentence, symptom, status, explanation): evidence for each symptom shown, and for 30% of posts
    1-2 hard negatives (same topic, not evidence) of symptoms not shown, so post-level labels stay clean."""
    symptoms, rows = ph["symptoms"], []
    for sym in positives:
        cores, expl = symptoms[sym]["evidence"], symptoms[sym]["evidence_explanations"]
        # A doubled symptom takes two different cores, so neither sentence contains the other.
        for core in rng.sample(cores, 2 if rng.random() < 0.15 else 1):
            rows.append((_sentence(rng, ph["ev_openers"], core, ph["ev_tails"]), sym, 1, rng.choice(expl)))
    if rng.random() < 0.30:
        others = [s for s in symptoms if s not in positives]
        for sym in rng.sample(others, rng.randint(1, 2)):
            cores, expl = symptoms[sym]["negative"], symptoms[sym]["negative_explanations"]
            rows.append((_sentence(rng, ph["neg_openers"], rng.choice(cores), ph["neg_tails"]), sym, 0,
                         rng.choice(expl)))
    return rows


def _post_length(rng: random.Random, at_least: int) -> int:
    """Sentences in a post: a long tail (2% of posts 150-500 sentences, 10% 20-80, the rest 3-15)."""
    u = rng.random()
    n = rng.randint(150, 500) if u < 0.02 else rng.randint(20, 80) if u < 0.12 else rng.randint(3, 15)
    return max(n, at_least)


def make_demo(n_posts: int = 1000, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Generate a SYNTHETIC corpus in the ReDSM5 format (template text, not real Reddit data).

    Returns (posts, annotations). posts: {"post_id", "text"}, the text being its sentences
    joined by single spaces. annotations: {"post_id", "sentence_id", "sentence_text",
    "DSM5_symptom", "status", "explanation"}, with sentence_id f"{post_id}_{i}" (i = 0-based
    sentence index) and status 1 for evidence, 0 for a hard negative (same topic, not
    evidence). About 25% of posts have no symptom, 30% carry 1-2 hard negatives, and post
    lengths have a long tail (~2% of posts have 150-500 sentences). Every sentence occurs
    once per post, so str.find locates sentence_text unambiguously. Deterministic in seed.
    """
    ph, rng = load_phrases(), random.Random(seed)
    posts, annotations = [], []
    width = max(5, len(str(n_posts - 1)))
    for p in range(n_posts):
        post_id = f"demo_{p:0{width}d}"
        rows = _annotated_sentences(rng, ph, _post_symptoms(rng, ph))
        n = _post_length(rng, len(rows))
        sentences = rng.sample(ph["filler_pool"], n)
        # Uniform positions: evidence lands anywhere, including deep into long posts.
        positions = rng.sample(range(n), len(rows))
        for pos, (text, sym, status, expl) in sorted(zip(positions, rows)):
            sentences[pos] = text
            annotations.append({"post_id": post_id, "sentence_id": f"{post_id}_{pos}",
                                "sentence_text": text, "DSM5_symptom": sym, "status": status,
                                "explanation": expl})
        posts.append({"post_id": post_id, "text": " ".join(sentences)})
    return posts, annotations


def write_demo(out_dir: str | Path, n_posts: int, seed: int) -> None:
    """posts.csv + annotations.csv of the demo corpus in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    posts, annotations = make_demo(n_posts, seed)
    for name, rows, cols in (("posts.csv", posts, POST_COLUMNS), ("annotations.csv", annotations, ANNOTATION_COLUMNS)):
        with open(out_dir / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)
