"""The error page marks exactly the hand-computed sentences and symptoms, orders posts by their error weight, escapes
post text, counts what metrics.json counts; a run writes it and logs it to MLflow; evaluate.py --html writes it, and
refuses a bad path in one line."""
import json
import math
import re
from pathlib import Path

import pytest
from conftest import write_quirky

import errorpage
import evaluate
import runner
from config import make_config
from metrics import classification_metrics

A_TEXT = "I cannot sleep at night. My cat is fine. I feel tired all day. We went out."
B_TEXT = "<script>alert(1)</script> I hate myself. Nothing else matters."
C_TEXT = "Everything is fine. I am tired."


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def evidence_row(post_id, criterion, gold, pred, scores):
    """A row as scoring.score_spans writes it for the evidence task (only the fields the page reads, and a label)."""
    return {"post_id": post_id, "criterion": criterion, "label": 1, "gold_texts": ["x"] if gold else [],
            "gold_sentences": gold, "pred_sentences": pred, "sentence_scores": scores}


# threshold 0.5: p = sigmoid(score - 0.5)
EVIDENCE_ROWS = [
    evidence_row("A", "SLEEP_ISSUES", [0], [0, 1], [2.5, 1.0, None, -3.0]),  # s0 hit p .881, s1 false alarm p .622
    evidence_row("A", "FATIGUE", [2], [], [-2.0, -2.0, -0.5, -2.0]),  # s2 missed p .269
    evidence_row("B", "WORTHLESSNESS", [0], [1], [-1.0, 0.7]),  # s0 missed p .182, s1 false alarm p .550
    evidence_row("C", "FATIGUE", [1], [1], [-4.0, 3.0]),  # s1 hit: no wrong decision
]
EVIDENCE_EXAMPLES = [{"text": t} for t in (A_TEXT, A_TEXT, B_TEXT, C_TEXT)]
LINE = re.compile(r'<li class="(\w+)"><span class="n">([^<]*)</span><span class="t">(.*?)</span>(.*?)</li>')
MARK = re.compile(r'data-level="(\w+)" data-kind="(\w+)" title="[^"]*">\S+ (\w+) <b>([\d.]+)</b>')


def marked_lines(page: str, post_id: str) -> dict:
    """{sentence label: [(kind, criterion, p)]} of one post's card, read back from the HTML."""
    card = page.split(f"<code>{post_id}</code>", 1)[1].split("</section>", 1)[0]
    return {n: [(kind, criterion, float(p)) for _, kind, criterion, p in MARK.findall(chips)]
            for _, n, _, chips in LINE.findall(card)}


def test_the_page_marks_exactly_the_hand_computed_sentences():
    page = errorpage.render_page(errorpage.post_cards(EVIDENCE_ROWS, EVIDENCE_EXAMPLES, 0.5), {}, "t")
    assert marked_lines(page, "A") == {
        "0": [("hit", "SLEEP_ISSUES", round(sigmoid(2.0), 2))],
        "1": [("false_alarm", "SLEEP_ISSUES", round(sigmoid(0.5), 2))],
        "2": [("missed", "FATIGUE", round(sigmoid(-1.0), 2))],
        "3": []}  # shown as context of sentence 2 (CONTEXT = 1), unmarked
    assert marked_lines(page, "B") == {"0": [("missed", "WORTHLESSNESS", round(sigmoid(-1.5), 2))],
                                       "1": [("false_alarm", "WORTHLESSNESS", round(sigmoid(0.2), 2))]}
    assert "<code>C</code>" not in page  # no wrong decision: counted, not shown
    assert "3 posts scored: 2 with at least one wrong decision" in page
    assert "Evidence sentences: 2 hits, 2 missed, 2 false alarms: precision 0.5000, recall 0.5000" in page


def test_posts_are_ordered_by_their_error_weight():
    cards = errorpage.post_cards(EVIDENCE_ROWS, EVIDENCE_EXAMPLES, 0.5)
    # A: false alarm p .622 + miss 1 - .269 = 1.354; B: miss 1 - .182 + false alarm .550 = 1.368; C: 0
    assert [c["post_id"] for c in cards] == ["B", "A", "C"]
    assert cards[0]["error"] == pytest.approx(1 - sigmoid(-1.5) + sigmoid(0.2))
    assert cards[1]["error"] == pytest.approx(sigmoid(0.5) + 1 - sigmoid(-1.0))
    assert [c["n_wrong"] for c in cards] == [2, 2, 0]
    page = errorpage.render_page(cards, {}, "t")
    assert page.index("<code>B</code>") < page.index("<code>A</code>")
    capped = errorpage.render_page(cards, {}, "t", max_posts=1)
    assert "<code>A</code>" not in capped and "(1 shown, the 1 least wrong left out)" in capped


def test_post_text_is_escaped():
    page = errorpage.render_page(errorpage.post_cards(EVIDENCE_ROWS, EVIDENCE_EXAMPLES, 0.5), {}, "<b>title</b>")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; I hate myself." in page
    assert "<title>&lt;b&gt;title&lt;/b&gt;</title>" in page
    assert page.isascii()  # non-ASCII (the legend's symbols, a post's letters) as character references


def test_criteria_counts_are_the_confusion_matrix():
    """Post-level criteria (and joint): each (post, symptom) decision at 0.5; the page's counts are
    classification_metrics' confusion matrix of the same rows."""
    rows = [{"post_id": p, "criterion": c, "label": y, "prob": pr, "pred": int(pr >= 0.5)} for p, c, y, pr in [
        ("A", "SLEEP_ISSUES", 1, 0.9), ("A", "FATIGUE", 1, 0.2), ("A", "ANHEDONIA", 0, 0.7),
        ("B", "SLEEP_ISSUES", 0, 0.1), ("B", "FATIGUE", 1, 0.45), ("B", "ANHEDONIA", 0, 0.3)]]
    cards = errorpage.post_cards(rows, [{"text": "post"}] * len(rows))
    assert [c["post_id"] for c in cards] == ["A", "B"]  # A: .8 + .7 = 1.5 > B: .55
    (tn, fp), (fn, tp) = classification_metrics([r["label"] for r in rows], [r["prob"] for r in rows])[
        "confusion_matrix"]
    counts = errorpage.decision_counts(cards)
    assert [counts["criteria", k] for k in ("hit", "missed", "false_alarm", "correct")] == [tp, fn, fp, tn] == [
        1, 2, 1, 2]
    page = errorpage.render_page(cards, {"confusion_matrix": [[tn, fp], [fn, tp]]}, "t")
    assert page.count('data-level="criteria" data-kind="missed"') == fn
    assert "Symptom decisions: 1 hits, 2 missed, 1 false alarms, 2 correct no" in page


def test_sentence_level_criteria_marks_each_annotated_sentence():
    rows = [{"post_id": "A", "criterion": "FATIGUE", "label": 1, "sentence_id": "A_3", "prob": 0.3, "pred": 0},
            {"post_id": "A", "criterion": "SLEEP_ISSUES", "label": 0, "sentence_id": "A_0", "prob": 0.1, "pred": 0}]
    page = errorpage.render_page(errorpage.post_cards(rows, [{"text": "I am tired."}, {"text": "I sleep well."}]),
                                 {}, "t")
    assert marked_lines(page, "A") == {"A_3": [("missed", "FATIGUE", 0.3)], "A_0": [("correct", "SLEEP_ISSUES", 0.1)]}


# --------------------------------------------------------------------------- a trained run, and evaluate.py --html

SMALL = dict(mlflow=True, demo_posts=60, tiny_hidden=16, tiny_layers=1, tiny_heads=1, tiny_vocab=300, max_length=96,
             doc_stride=16, batch_size=8, demo_shift_posts=0, epochs=2)


@pytest.fixture(scope="module")
def evidence_run(tmp_path_factory):
    """A small evidence run on the demo, tracked in an MLflow store in its tmp folder (MLflow 3 refuses a file: store
    as a backend: in maintenance mode)."""
    tmp = tmp_path_factory.mktemp("errorpage")
    cfg = make_config(task="evidence", output_dir=str(tmp / "run"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                      **SMALL)
    results = runner.run(cfg)
    return cfg, results, Path(cfg.output_dir)


def test_a_run_writes_its_error_page_with_metrics_json_counts_and_logs_it(evidence_run):
    from mlflow.tracking import MlflowClient

    cfg, results, out = evidence_run
    page = (out / "error_page.html").read_text()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test = json.loads((out / "metrics.json").read_text())["test"]
    missed = sum(len(set(r["gold_sentences"]) - set(r["pred_sentences"])) for r in rows)  # the sentence-level FN
    n_gold = sum(len(r["gold_sentences"]) for r in rows)
    assert page.count('data-level="evidence" data-kind="missed"') == missed
    assert (n_gold - missed) / n_gold == test["sentence_recall"]  # the same counts as metrics.json's, exactly
    assert f"{n_gold - missed} hits, {missed} missed" in page
    assert f"(metrics.json sentence_precision {test['sentence_precision']:.4f}" in page
    assert all(len(r["sentence_scores"]) >= 1 + max(r["gold_sentences"] + r["pred_sentences"]) for r in rows)
    logged = {a.path: a.file_size for a in MlflowClient(cfg.tracking_uri).list_artifacts(results["train"][
        "mlflow_run_id"])}
    assert logged["error_page.html"] == (out / "error_page.html").stat().st_size


def test_evaluate_html_writes_the_same_page_for_the_run_checkpoint(cli, evidence_run, tmp_path):
    _, _, out = evidence_run
    code, err = cli(evaluate.main, ["--checkpoint", out / "checkpoints" / "best", "--html", tmp_path / "e.html"])
    assert code == 0, err
    assert "wrote the error page" in err
    body = (tmp_path / "e.html").read_text().split("</h1>", 1)[1]  # past the title, which names the folder
    assert body == (out / "error_page.html").read_text().split("</h1>", 1)[1]


def one_error_line(code, err):
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("where, needle", [("a_dir", "is a directory"), ("no_dir/x.html", "does not exist"),
                                           ("posts.csv/x.html", "does not exist")])
def test_evaluate_html_to_a_bad_path_is_one_line_before_loading(cli, tmp_path, where, needle):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "posts.csv").write_text("post_id,text\n")
    html = tmp_path / where
    line = one_error_line(*cli(evaluate.main, ["--checkpoint", tmp_path / "none", "--html", html]))
    assert line.startswith(f"error: --html {html}: ") and needle in line


def test_evaluate_html_refuses_an_input_file_the_output_file_and_predict(cli, checkpoint, tmp_path):
    data = write_quirky(tmp_path / "data")
    line = one_error_line(*cli(evaluate.main, ["--checkpoint", checkpoint, "--data_dir", data, "--html",
                                               data / "posts.csv"]))
    assert f"--html {data / 'posts.csv'}: is the --data_dir file" in line
    line = one_error_line(*cli(evaluate.main, ["--checkpoint", checkpoint, "--html", tmp_path / "x",
                                               "--output", tmp_path / "x"]))
    assert "--html" in line and "is also the --output file" in line
    (tmp_path / "new.csv").write_text("post_id,text\np1,I cannot sleep.\n")
    line = one_error_line(*cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", tmp_path / "new.csv", "--html",
                                               tmp_path / "p.html"]))
    assert line.startswith("error: --html: ") and "--predict" in line
