"""The SYNTHETIC demo corpus: template text in the ReDSM5 format, not real Reddit data.

    python data.py --make_demo DIR [--n_posts N] [--seed S]   # posts.csv + annotations.csv (+ DIR/shift/)

It is the default data of every command, so that the whole pipeline runs offline: a pure function
of (n_posts, seed, part), generated in well under a second, scaling to 100k posts for benchmarks.
Its phrases live in configs/demo_corpus.yaml, which explains the composition: a symptom sentence is
opener + frame + tail, where the frame (evidence, negation, someone else's symptom, a resolved past,
the topic in passing, a denial) sets the label and every word piece is shared by the kinds. Every 4th
item of each phrase list is held out: part "main" (train/val/test) never uses those items, part
"shift" (the test_shift set) uses only them. This module imports nothing of ours.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
import string
from pathlib import Path

DEMO_PHRASES = Path(__file__).resolve().parent / "configs" / "demo_corpus.yaml"
PARTS = ("main", "shift")
HARD_NEGATIVE_POSTS = 0.7  # share of posts with 1-3 hard negatives (of symptoms the post does not show)

# The verbs of the cores (first-person clauses "I <verb> ..."), for their third-person and past forms.
ADVERBS = {"barely", "never", "always", "still", "just", "really", "constantly", "hardly", "only", "even"}
UNCHANGED = {"can't", "cannot", "can", "could", "won't", "wouldn't", "will", "would", "was", "used"}
THIRD = {"am": "is", "have": "has", "do": "does", "don't": "doesn't", "go": "goes"}
PAST = {"am": "was", "have": "had", "do": "did", "don't": "didn't", "can't": "couldn't", "cannot": "could not",
        "can": "could", "won't": "wouldn't", "will": "would", "keep": "kept", "feel": "felt", "sleep": "slept",
        "eat": "ate", "wake": "woke", "lie": "lay", "think": "thought", "forget": "forgot", "get": "got",
        "lose": "lost", "go": "went", "sit": "sat", "know": "knew", "find": "found", "quit": "quit", "skip": "skipped",
        "drag": "dragged", "run": "ran", "read": "read", "see": "saw", "carry": "carried", "mess": "messed"}
PRONOUNS = {"he": {"he": "he", "his": "his", "him": "him", "himself": "himself"},
            "she": {"he": "she", "his": "her", "him": "her", "himself": "herself"}}
_CHOICE = re.compile(r"\(([^()]*)\)")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def expand(template: str) -> list[str]:
    """Every phrasing of a template: "I (can't|cannot) sleep" -> ["I can't sleep", "I cannot sleep"]."""
    pieces = _CHOICE.split(template)  # literal, choices, literal, choices, ...
    options = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(pieces)]
    return ["".join(o) for o in itertools.product(*options)]


def verb_form(verb: str, tense: str) -> str:
    """A core's verb in the third person ('third') or the past ('past'); -ed forms and modals stay."""
    if verb in UNCHANGED or verb.endswith("ed"):
        return verb
    table = THIRD if tense == "third" else PAST
    if verb in table:
        return table[verb]
    if tense == "third":
        return verb + "es" if verb.endswith(("s", "sh", "ch", "x")) else \
            verb[:-1] + "ies" if verb.endswith("y") and verb[-2] not in "aeiou" else verb + "s"
    return verb + "d" if verb.endswith("e") else \
        verb[:-1] + "ied" if verb.endswith("y") and verb[-2] not in "aeiou" else verb + "ed"


def conjugate(clause: str, tense: str) -> str:
    """A first-person core said of someone else ('third': a template with {who} as its first subject and
    {he} {his} {him} {himself} after it) or in the past ('past'). The verb after each "I" changes."""
    third, out, verb_next, first = tense == "third", [], False, True
    for w in clause.split(" "):
        if w in ("I", "I'm", "I've"):
            subject = ("{who}" if first else "{he}") if third else "I"
            first, verb_next = False, w == "I"
            out.append(subject if w == "I" else subject + "'s" if third else {"I'm": "I was", "I've": "I had"}[w])
        elif verb_next and w in ADVERBS:
            out.append(w)
        elif verb_next:
            out.append(verb_form(w, tense))
            verb_next = False
        else:
            out.append({"my": "{his}", "me": "{him}", "myself": "{himself}"}.get(w, w) if third else w)
    return " ".join(out)


def split_part(items: list, part: str) -> list:
    """The items of one part: every 4th non-empty item is held out for 'shift'; '' (no opener, tail or time
    phrase) belongs to both parts."""
    empty, full = [x for x in items if x == ""], [x for x in items if x != ""]
    return empty + [x for i, x in enumerate(full) if (i % 4 == 3) == (part == "shift")]


@functools.lru_cache(maxsize=4)
def pieces(part: str = "main", path: Path = DEMO_PHRASES) -> dict:
    """The phrase pieces of one part, expanded: cores as (present, third-person template, past) phrasings,
    lists of phrasings per entry (an entry is drawn first, so long expansions do not dominate), and
    every filler sentence up front (one rng.sample per post is fast and distinct by construction)."""
    import yaml

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    ph = yaml.safe_load(path.read_text())
    pc = {k: split_part(ph[k], part) for k in ("openers", "tails", "times", "whens")}
    pc["relatives"] = [tuple(r.split("/")) for r in split_part(ph["relatives"], part)]
    pc["frames"] = {k: [[(f, frozenset(s for _, s, _, _ in string.Formatter().parse(f) if s)) for f in expand(e)]
                        for e in split_part(v, part)] for k, v in ph["frames"].items()}
    pc["evidence_routes"], pc["negative_kinds"] = ph["evidence_routes"], ph["negative_kinds"]
    pc["kinds"] = list(ph["negative_kinds"])
    pc["kind_weights"] = [sum(routes.values()) for routes in ph["negative_kinds"].values()]
    pc["kind_explanations"], pc["weights"] = ph["kind_explanations"], ph["weights"]
    pc["symptoms"] = {sym: {
        "cores": [[(c, conjugate(c, "third"), conjugate(c, "past")) for c in expand(e)]
                  for e in split_part(s["cores"], part)],
        "denials": [[(c, conjugate(c, "third"), conjugate(c, "past")) for c in expand(e)]
                    for e in split_part(s["denials"], part)],
        "topics": split_part(s["topics"], part),
        "evidence_explanations": s["evidence_explanations"], "negative_explanations": s["negative_explanations"],
    } for sym, s in ph["symptoms"].items()}
    openers = ph["filler_openers"] + [o for o in pc["openers"] if o]  # shared openers: no giveaway of evidence
    fillers = [_cap(o + c + t + p) for o, c, t, p in itertools.product(
        openers, ph["filler_clauses"], ph["filler_tails"], ".!")]
    pc["filler_pool"] = list(dict.fromkeys(fillers)) + ph["filler_questions"]
    return pc


def clause(rng: random.Random, pc: dict, sym: str, which: str, entry: list | None = None) -> tuple:
    """(present, third-person template, past) of a core or a denial of `sym`; `entry`: phrasings to draw from."""
    s = pc["symptoms"][sym]
    return rng.choice(entry or rng.choice(s["cores" if which == "core" else "denials"]))


def compose(rng: random.Random, pc: dict, route: str, sym: str, entry: list | None = None) -> str:
    """One sentence about `sym` by `route` ("<frame list> <core|denial>"); `entry`: the core phrasings.
    Only the slots the frame has are drawn (the generator's time goes to random draws)."""
    frames, which = route.split()
    frame, slots = rng.choice(rng.choice(pc["frames"][frames]))
    present, third, past = clause(rng, pc, sym, which, entry)
    values = {"x": present, "xp": past}
    if slots & {"rel", "x3", "r3", "o3"}:
        rel, pro = rng.choice(pc["relatives"])
        forms = PRONOUNS[pro]
        values.update(rel=rel, x3=third.format(who=pro, **forms), r3=third.format(who=rel, **forms))
        if "o3" in slots:  # the contrast's other side, said of rel
            values["o3"] = clause(rng, pc, sym, "denial" if which == "core" else "core")[1].format(who=rel, **forms)
    for slot, pool in (("t", pc["times"]), ("when", pc["whens"]), ("topic", pc["symptoms"][sym]["topics"])):
        if slot in slots:
            values[slot] = rng.choice(pool)
    return _cap(rng.choice(pc["openers"]) + frame.format(**values) + rng.choice(pc["tails"]) + rng.choice("...!"))


def _distinct(rng: random.Random, taken: list[str], make) -> str:
    """A sentence from make() that neither contains nor is contained in one already in the post, so that
    str.find locates every annotated sentence once."""
    for _ in range(50):
        text = make()
        if not any(text in t or t in text for t in taken):
            break
    taken.append(text)
    return text


def _post_symptoms(rng: random.Random, pc: dict) -> list[str]:
    """The symptoms a post shows: none for about a quarter of posts, else 1-4, weighted by prevalence."""
    positives, names = [], list(pc["symptoms"])
    if rng.random() >= 0.25:
        pool, weights = names[:], [pc["weights"][s] for s in names]
        for _ in range(rng.choices((1, 2, 3, 4), weights=(45, 30, 17, 8))[0]):
            i = rng.choices(range(len(pool)), weights=weights)[0]
            positives.append(pool.pop(i))
            weights.pop(i)
    return positives


def _route(rng: random.Random, routes: dict) -> str:
    return rng.choices(list(routes), weights=list(routes.values()))[0] if len(routes) > 1 else next(iter(routes))


def _annotated_sentences(rng: random.Random, pc: dict, positives: list[str]) -> list[tuple]:
    """(sentence, symptom, status, explanation): evidence for each symptom shown (15% of them twice, from two
    different cores), and for some posts 1-2 hard negatives of symptoms not shown, so post labels stay clean."""
    symptoms, rows, taken = pc["symptoms"], [], []
    for sym in positives:
        for entry in rng.sample(symptoms[sym]["cores"], 2 if rng.random() < 0.15 else 1):
            route = _route(rng, pc["evidence_routes"])
            text = _distinct(rng, taken, lambda: compose(rng, pc, route, sym, entry if "core" in route else None))
            rows.append((text, sym, 1, rng.choice(symptoms[sym]["evidence_explanations"])))
    if rng.random() < HARD_NEGATIVE_POSTS:
        for sym in rng.sample([s for s in symptoms if s not in positives], rng.randint(1, 3)):
            kind = rng.choices(pc["kinds"], weights=pc["kind_weights"])[0]
            route = _route(rng, pc["negative_kinds"][kind])
            text = _distinct(rng, taken, lambda: compose(rng, pc, route, sym))
            why = rng.choice(symptoms[sym]["negative_explanations"]) if kind == "denial" else \
                pc["kind_explanations"][kind]
            rows.append((text, sym, 0, why))
    return rows


def _post_length(rng: random.Random, at_least: int) -> int:
    """Sentences in a post: a long tail (2% of posts 150-500 sentences, 10% 20-80, the rest 3-15)."""
    u = rng.random()
    n = rng.randint(150, 500) if u < 0.02 else rng.randint(20, 80) if u < 0.12 else rng.randint(3, 15)
    return max(n, at_least)


def make_demo(n_posts: int = 1000, seed: int = 0, part: str = "main") -> tuple[list[dict], list[dict]]:
    """Generate a SYNTHETIC corpus in the ReDSM5 format (template text, not real Reddit data).

    Returns (posts, annotations). posts: {"post_id", "text"}, the text being its sentences
    joined by single spaces. annotations: {"post_id", "sentence_id", "sentence_text",
    "DSM5_symptom", "status", "explanation"}, with sentence_id f"{post_id}_{i}" (i = 0-based
    sentence index) and status 1 for evidence, 0 for a hard negative (negated, someone else's,
    past and resolved, the topic in passing, or a denial). About 25% of posts have no symptom,
    40% carry 1-2 hard negatives, and post lengths have a long tail (~2% of posts have 150-500
    sentences). Every sentence occurs once per post, so str.find locates sentence_text
    unambiguously. part "main" uses the in-distribution phrasing, "shift" only the held-out
    phrasing, from its own random stream (ids shift_*). Deterministic in (n_posts, seed, part).
    """
    pc = pieces(part)
    rng = random.Random(seed if part == "main" else f"{part}:{seed}")
    posts, annotations = [], []
    width, prefix = max(5, len(str(n_posts - 1))), "demo" if part == "main" else part
    for p in range(n_posts):
        post_id = f"{prefix}_{p:0{width}d}"
        rows = _annotated_sentences(rng, pc, _post_symptoms(rng, pc))
        n = _post_length(rng, len(rows))
        sentences = rng.sample(pc["filler_pool"], n)
        # Uniform positions: evidence lands anywhere, including deep into long posts.
        positions = rng.sample(range(n), len(rows))
        for pos, (text, sym, status, expl) in sorted(zip(positions, rows)):
            sentences[pos] = text
            annotations.append({"post_id": post_id, "sentence_id": f"{post_id}_{pos}",
                                "sentence_text": text, "DSM5_symptom": sym, "status": status,
                                "explanation": expl})
        posts.append({"post_id": post_id, "text": " ".join(sentences)})
    return posts, annotations
