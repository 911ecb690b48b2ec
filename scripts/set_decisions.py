"""Evidence set decisions compared on one checkpoint: which of a pair's sentences are its evidence, by each rule,
tuned on the run's validation posts and scored on its test posts, its shifted test set and other corpora.

    python scripts/set_decisions.py --checkpoint RUN/checkpoints/best [--data_dir corpora/handwritten ...]
    python scripts/set_decisions.py --checkpoint CV/fold*-seed*/checkpoints/best   # report.py's folds, pooled

With several checkpoints (the folds of report.py), each tunes on its own validation posts and the scored pairs of
every set are pooled over them (a fold's test posts are scored once).

Rules (a sentence's score is the one evaluate.py decodes: the mean tag logit of its tokens, or its best span):
  absolute      score > t, t tuned on validation (the best sentence when none passes)
  per_criterion score > t_c, one t per criterion tuned on its validation pairs (the global t for a criterion with
                fewer than 10 of them)
  relative      score > best score of the pair - m, m tuned on validation
  zero          score > 0: the tag head's own "inside evidence" decision at p = 0.5, nothing tuned
Prints one Markdown table of sentence_f1 / set_exact_match per rule and scored set (the pairs with gold evidence).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import alignment  # noqa: E402
import data  # noqa: E402
import decoding  # noqa: E402
from checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from config import post_encoding  # noqa: E402
from decoding import pair_rows, sentence_scores, sentences_of_spans, tune_sentence_threshold  # noqa: E402
from features import make_loader  # noqa: E402
from metrics import best_threshold, sentence_set_metrics  # noqa: E402
from models import TASKS, featurize  # noqa: E402
from scoring import model_outputs  # noqa: E402
from splits import load_splits  # noqa: E402
from utils import make_accelerator  # noqa: E402

SET_RULES = ("absolute", "per_criterion", "relative", "zero")


def decode_sets(scores, decision: dict, criteria) -> list[set[int]]:
    """Each pair's evidence sentences by `decision` (tune_set_decision); the best sentence when none passes (every
    scored pair has gold evidence). The absolute rules are decoding.decode_sets, what evaluate.py does, at the
    pair's threshold."""
    if decision["rule"] == "relative":
        return [decoding.decode_sets([s], s.max() - decision["margin"] if len(s) else 0.0, True)[0]
                for s in scores]
    per = decision.get("per_criterion", {})
    return [decoding.decode_sets([s], per.get(c, decision["threshold"]), True)[0] for s, c in zip(scores, criteria)]


def tune_set_decision(rule: str, scores, gold_sets, criteria) -> dict:
    """The decision of `rule` tuned on validation pairs for the best sentence_f1 + set_exact_match (the objective
    of decoding.tune_sentence_threshold, which tunes the absolute one)."""
    if rule == "zero":
        return {"rule": "absolute", "threshold": 0.0}
    if rule == "relative":
        gaps = np.concatenate([s.max() - s[np.isfinite(s)] for s in scores if len(s)] + [np.zeros(1)])
        points = np.unique(np.quantile(gaps, np.linspace(0, 1, 201)))
        candidates = np.concatenate([[0.0], (points[:-1] + points[1:]) / 2])
        objective = [sentence_set_metrics(gold_sets, decode_sets(scores, {"rule": "relative", "margin": m}, criteria))
                     for m in candidates]
        return {"rule": "relative",
                "margin": best_threshold(candidates, [o["sentence_f1"] + o["set_exact_match"] for o in objective])}
    decision = {"rule": "absolute", "threshold": tune_sentence_threshold(scores, gold_sets, True)}
    if rule == "per_criterion":
        for c in sorted(set(criteria)):
            rows = [i for i, k in enumerate(criteria) if k == c]
            if len(rows) >= 10:
                decision.setdefault("per_criterion", {})[c] = tune_sentence_threshold(
                    [scores[i] for i in rows], [gold_sets[i] for i in rows], True)
    return decision


def scored_pairs(model, tokenizer, cfg, corpus, post_ids, accelerator):
    """(sentence scores, gold sentence sets, criteria) of the pairs with gold evidence among `post_ids`."""
    examples = TASKS[cfg.task].examples(corpus, post_ids, cfg)
    features = featurize(cfg, tokenizer, examples)
    loader = accelerator.prepare(make_loader(features, cfg.eval_batch_size, False, tokenizer.pad_token_id))
    out = model_outputs(model, loader, accelerator, cfg)
    if post_encoding(cfg):
        out, features = pair_rows(out, features)
    texts = [e["text"] for e in examples]
    split = {t: alignment.sentence_spans(t) for t in set(texts)}
    scores = sentence_scores(features, out, texts, split)
    gold = [sentences_of_spans(t, e["spans"], split[t]) for e, t in zip(examples, texts)]
    keep = [i for i, g in enumerate(gold) if g]
    return [scores[i] for i in keep], [gold[i] for i in keep], [examples[i]["criterion"] for i in keep]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, nargs="+")
    parser.add_argument("--data_dir", nargs="*", default=[], help="other labelled corpora, each scored whole")
    args = parser.parse_args()
    accelerator = make_accelerator()
    runs = [checkpoint_sets(path, args.data_dir, accelerator) for path in args.checkpoint]
    names = list(runs[0][1])
    pooled = {k: [sum((run[1][k][j] for run in runs), []) for j in range(3)] for k in names}
    cfg = runs[0][0]
    print(f"{len(runs)} checkpoint(s) ({cfg.task}, {cfg.model}, {cfg.evidence_head} head); pairs with gold evidence: "
          + ", ".join(f"{k} {len(v[1])} (gold sets of 2+: {sum(len(g) > 1 for g in v[1])})" for k, v in pooled.items()))
    print("\n| rule | tuned | " + " | ".join(f"{k} sentence_f1 / set_exact_match" for k in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for rule in SET_RULES:
        decoded, tuned = {k: ([], []) for k in names}, []
        for _, sets in runs:
            decision = tune_set_decision(rule, *sets["val"])
            tuned.append(decision.get("threshold", decision.get("margin")))
            for k, (scores, gold, criteria) in sets.items():
                decoded[k][0].extend(gold)
                decoded[k][1].extend(decode_sets(scores, decision, criteria))
        cells = [sentence_set_metrics(*decoded[k]) for k in names]
        print(f"| {rule} | {', '.join(f'{t:.3f}' for t in tuned)} | "
              + " | ".join(f"{m['sentence_f1']:.3f} / {m['set_exact_match']:.3f}" for m in cells) + " |")


def checkpoint_sets(path, data_dirs, accelerator) -> tuple:
    """(config, {set name: scored_pairs}) of one checkpoint: its val and test posts, its shifted test set, and
    every post of each other corpus."""
    checkpoint = resolve_checkpoint(path)
    model, tokenizer, cfg, _ = load_checkpoint(checkpoint)
    model = accelerator.prepare(model)
    corpus = data.load_corpus_from_config(cfg, cfg.data_dir)
    splits = load_splits(checkpoint / "splits.json", corpus)
    sets = {name: scored_pairs(model, tokenizer, cfg, corpus, splits[name], accelerator) for name in ("val", "test")}
    shift = data.load_shift_corpus(cfg)
    if shift is not None:
        sets["test_shift"] = scored_pairs(model, tokenizer, cfg, shift, sorted(shift.posts), accelerator)
    for other_dir in data_dirs:
        other = data.load_corpus_from_config(cfg, other_dir)
        sets[Path(other_dir).name] = scored_pairs(model, tokenizer, cfg, other, sorted(other.posts), accelerator)
    return cfg, sets


if __name__ == "__main__":
    main()
