"""report.py and baselines.py: bootstrap intervals, thresholds, grouped stratified folds, baselines, and a tiny CV
run end to end."""
from collections import Counter

import numpy as np
import pytest

import baselines
import data
import intervals
import metrics
import report
import splits as splitting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--task", "criteria", "--demo_posts", "60", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads", "1",
        "--tiny_vocab", "300", "--max_length", "64", "--doc_stride", "16", "--batch_size", "16", "--max_steps", "2",
        "--epochs", "1", "--log_every", "1", "--threads", "1", "--demo_shift_posts", "20"]


# --------------------------------------------------------------------------- statistics

def test_bootstrap_ci_hand_computed():
    assert intervals.bootstrap_ci([0.7] * 5) == (0.7, 0.7)  # no spread, no width
    # [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5% points are 0 and 1
    assert intervals.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 1]: the mean is k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.32 > 2.5%, P(k >= 3) = 5.1%, P(k = 4) = 0.4%
    assert intervals.bootstrap_ci([0.0, 0.0, 0.0, 1.0]) == (0.0, 0.75)
    assert intervals.bootstrap_ci([1.0, 2.0, 4.0], seed=3) == intervals.bootstrap_ci([1.0, 2.0, 4.0], seed=3)  # seeded


def test_bootstrap_ci_matches_normal_theory_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 2, 25), rng.normal(10, 2, 400)
    lo, hi = intervals.bootstrap_ci(large)
    half = 1.96 * large.std(ddof=1) / np.sqrt(len(large))
    assert lo < large.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert np.subtract(*intervals.bootstrap_ci(small)[::-1]) > 3 * (hi - lo)  # sqrt(400/25) = 4x wider, give or take


def test_corrected_t_interval_hand_computed():
    # mean 0.9, s = 0.1, n = 3, n_test/n_train = 0.5: half width t(2, 0.975) * sqrt((1/3 + 0.5) * 0.01)
    low, high = intervals.corrected_t_ci([0.8, 0.9, 1.0], 0.5)
    assert (low, high) == pytest.approx((0.9 - 4.302653 * 0.0912871, 0.9 + 4.302653 * 0.0912871), abs=1e-6)
    no_overlap = intervals.corrected_t_ci([0.8, 0.9, 1.0], 0.0)  # independent runs: the plain t interval
    assert no_overlap == pytest.approx((0.9 - 4.302653 * 0.1 / 3**0.5, 0.9 + 4.302653 * 0.1 / 3**0.5), abs=1e-6)
    d = intervals.summarize([0.8, 0.9, 1.0], n_boot=2000, test_train_ratio=0.5)
    # wider than the bootstrap
    assert d["ci_corrected_low"] == pytest.approx(low) and d["ci_corrected_low"] < d["ci_low"]
    assert "ci_corrected_low" not in intervals.summarize([0.8, 0.9], n_boot=2000)  # one split: no correction


def test_summarize_skips_missing_values():
    s = intervals.summarize([0.8, None, 0.9, float("nan"), 1.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)  # sample std (ddof 1)
    assert s["ci_low"] <= 0.9 <= s["ci_high"]
    assert intervals.summarize([0.5])["std"] == 0.0 and intervals.summarize([])["mean"] is None
    runs = intervals.summarize_runs([{"f1": 0.5, "n": 10, "cm": [[1]]}, {"f1": 0.7, "auroc": 0.9}])
    assert list(runs) == ["f1", "auroc"] and runs["auroc"]["n"] == 1  # floats only: counts and matrices are not metrics


def test_choose_threshold_best_macro_f1_on_validation():
    # separable: every cut between 0.3 and 0.6 is perfect; the threshold is the midpoint
    assert baselines.choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9]) == pytest.approx(0.45)
    # cut >= 0.8: macro F1 (2/3 + 4/5) / 2 = 0.733; cut >= 0.35: (4/5 + 2/3) / 2 = 0.733, a tie: the higher one wins
    assert baselines.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.6)
    assert baselines.choose_threshold([1, 1], [0.2, 0.9]) == 0.5  # one class only: nothing to choose on


def test_criterion_table_hand_computed():
    rows = [{"criterion": "FATIGUE", "label": 1, "pred": 1}, {"criterion": "FATIGUE", "label": 1, "pred": 0},
            {"criterion": "FATIGUE", "label": 0, "pred": 1}, {"criterion": "ANHEDONIA", "label": 0, "pred": 0}]
    table = report.criterion_table(rows, classify=True, spans=False)
    assert list(table) == ["ANHEDONIA", "FATIGUE", "all"]  # DSM-5 order, then the pooled row
    assert table["FATIGUE"] == {"n": 3, "support": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert table["ANHEDONIA"]["f1"] == 0.0 and table["all"]["support"] == 2
    spans = [{"criterion": "FATIGUE", "label": 1, "pred_text": "I am tired.", "gold_texts": ["i am tired"]},
             {"criterion": "FATIGUE", "label": 1, "pred_text": "so tired", "gold_texts": ["I am tired", "no energy"]}]
    t = report.criterion_table(spans, classify=False, spans=True)["FATIGUE"]
    assert t["pairs"] == 2 and t["exact_match"] == 0.5 and t["span_f1"] == pytest.approx((1 + 0.4) / 2)
    merged = report.mean_tables([{"all": {"n": 4, "f1": 0.5}}, {"all": {"n": 4, "f1": 0.7}}])["all"]
    assert merged["f1"] == pytest.approx(0.6) and merged["f1_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


# --------------------------------------------------------------------------- folds

@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(None, demo_posts=300, demo_seed=1)


def test_folds_group_by_post_and_keep_strata(corpus):
    k, ids = 5, set(corpus.posts)
    folds = splitting.fold_splits(corpus, k, seed=7, val_ratio=0.1)
    tests = [set(f["test"]) for f in folds]
    assert sum(map(len, tests)) == len(ids) == len(set().union(*tests))  # every post in exactly one test fold
    strata = dict(zip(sorted(ids), splitting.post_strata(corpus, sorted(ids))))
    total = Counter(strata.values())
    assert len(total) >= 5  # the demo has real strata to keep
    for f in folds:
        parts = [set(f[s]) for s in ("train", "val", "test")]
        assert set().union(*parts) == ids and sum(map(len, parts)) == len(ids)  # no post in two parts of a fold
        assert len(f["val"]) == 30
        # tolerance: each stratum's count in a test fold is its total / k, rounded either way (at most 1 post off)
        held = Counter(strata[p] for p in f["test"])
        assert all(abs(held[s] - n / k) < 1 for s, n in total.items()), (held, total)
        # the validation slice keeps the strata of the posts it is cut from, within 1 post per stratum
        rest = sorted(f["train"] + f["val"])
        rest_strata = dict(zip(rest, splitting.post_strata(corpus, rest)))
        in_val, in_rest = Counter(rest_strata[p] for p in f["val"]), Counter(rest_strata.values())
        assert all(abs(in_val[s] - n * 30 / len(rest)) <= 1 for s, n in in_rest.items()), (in_val, in_rest)
    # the annotation rows follow their post: no row of a test post is trained on
    train_rows = {r["sentence_id"] for r in corpus.rows if r["post_id"] in set(folds[0]["train"])}
    assert not train_rows & {r["sentence_id"] for r in corpus.rows if r["post_id"] in tests[0]}
    assert splitting.fold_splits(corpus, k, seed=7, val_ratio=0.1) == folds  # deterministic
    assert splitting.fold_splits(corpus, 1, seed=7) == [splitting.split_posts(corpus, 7)]


# --------------------------------------------------------------------------- baselines

def test_baselines_hand_made_case():
    sentences = [("I cannot sleep at all.", 1), ("I never sleep well.", 1), ("Cannot sleep again tonight.", 1),
                 ("I sleep fine now.", 0), ("I cannot sleep.", 1), ("I sleep fine.", 0), ("Never sleep well.", 1),
                 ("Sleep is fine.", 0)]
    posts = [{"post_id": f"p{i}", "text": t} for i, (t, _) in enumerate(sentences)]
    anns = [{"post_id": f"p{i}", "sentence_id": f"p{i}_0", "sentence_text": t, "DSM5_symptom": "SLEEP_ISSUES",
             "status": str(y)} for i, (t, y) in enumerate(sentences)]
    corpus = data.build_corpus(posts, anns)
    split = {"train": ["p0", "p1", "p2", "p3"], "val": ["p6", "p7"], "test": ["p4", "p5"]}
    cfg = report.parse_config(["--task", "criteria"])[0]
    out = baselines.fold_baselines(corpus, split, cfg)["metrics"]
    majority = out["majority class"]  # 3 of 4 training rows are positive: "1" for every test row
    assert majority["confusion_matrix"] == [[0, 1], [0, 1]]
    assert (majority["accuracy"], majority["precision"], majority["recall"], majority["auroc"]) == (0.5, 0.5, 1.0, 0.5)
    assert majority["f1"] == pytest.approx(2 / 3) and majority["f1_macro"] == pytest.approx(1 / 3)
    bow = out["bag-of-words LR"]  # "cannot" and "never" against "fine"
    assert bow["confusion_matrix"] == [[1, 0], [0, 1]] and bow["f1_macro"] == 1.0 and bow["f1_at_val_threshold"] == 1.0
    assert baselines.bow_tokens({"text": "Sleep fine", "criterion": "SLEEP_ISSUES"}) == [
        "sleep", "fine", "sleep fine", "SLEEP_ISSUES|sleep", "SLEEP_ISSUES|fine", "SLEEP_ISSUES|sleep fine",
        "SLEEP_ISSUES"]
    assert baselines.first_sentence("I am tired. So tired!\nBye") == "I am tired."


def test_baselines_on_the_paper_matrix_with_unit_post():
    sentences = [("I cannot sleep at all.", 1), ("I never sleep well.", 1), ("Cannot sleep again tonight.", 1),
                 ("I sleep fine now.", 0), ("I cannot sleep.", 1), ("I sleep fine.", 0), ("Never sleep well.", 1),
                 ("Sleep is fine.", 0)]
    posts = [{"post_id": f"p{i}", "text": t} for i, (t, _) in enumerate(sentences)]
    anns = [{"post_id": f"p{i}", "sentence_id": f"p{i}_0", "sentence_text": t, "DSM5_symptom": "SLEEP_ISSUES",
             "status": str(y)} for i, (t, y) in enumerate(sentences)]
    corpus = data.build_corpus(posts, anns)
    split = {"train": ["p0", "p1", "p2", "p3"], "val": ["p6", "p7"], "test": ["p4", "p5"]}
    cfg = report.parse_config(["--task", "criteria", "--unit", "post"])[0]
    base = baselines.fold_baselines(corpus, split, cfg)
    majority = base["metrics"]["majority class"]
    # 3 of 36 training pairs are positive: nothing is called, so both test posts get NO_SYMPTOMS.
    # p4 (SLEEP_ISSUES): SLEEP fn, NO_SYMPTOMS fp; p5 (none): NO_SYMPTOMS tp -> micro 2*1 / (2+1+1) = 1/2,
    # macro: NO_SYMPTOMS F1 2/3, the other nine 0 -> 2/3 / 10
    assert majority["paper_micro_f1"] == pytest.approx(1 / 2) and majority["paper_macro_f1"] == pytest.approx(1 / 15)
    assert "paper_micro_f1_tuned" not in majority  # a constant has nothing to tune
    bow, rows = base["metrics"]["bag-of-words LR"], base["rows"]["bag-of-words LR"]
    _, gold, probs = metrics.post_label_matrix(rows, [r["prob"] for r in rows])  # its test pairs, refolded
    assert gold[:, -1].tolist() == [0, 1] and bow["paper_micro_f1"] == metrics.paper_metrics(
        gold, probs)["paper_micro_f1"]
    assert set(bow["paper_thresholds"]) == set(data.SYMPTOMS) and "paper_macro_f1_tuned" in bow


# --------------------------------------------------------------------------- end to end

def test_unit_post_report_has_the_paper_table(tmp_path, cli):
    out = tmp_path / "post"
    code, err = cli(report.main, TINY + ["--unit", "post", "--max_length", "96", "--cv_folds", "1", "--output_dir", out,
                                         "--mlflow", "false"])
    assert code == 0, err
    md = (out / "summary.md").read_text()
    assert "## Compared with the ReDSM5 paper" in md
    assert "| Llama-3.2-1B + classification head | 0.544 | 0.489 | – | – | published, on the authors' own split, " \
           "not rerun |" in md
    result = report.json.loads((out / "summary.json").read_text())
    model = result["summary"]["model"]["paper_micro_f1"]["mean"]
    assert f"| model | {model:.3f} ± 0.000 |" in md
    bow = result["summary"]["bag-of-words LR"]["paper_macro_f1_tuned"]["mean"]
    assert any(line.startswith("| bag-of-words LR |") and f"{bow:.3f} ± 0.000 | this report" in line
               for line in md.splitlines())
    assert [p["name"] for p in result["published"]][:2] == ["TF-IDF + LinearSVC", "1D CNN"]
    assert "| paper_micro_f1 | " in md  # also in the table of every metric



def test_compare_runs_the_other_recipe_on_the_same_folds_and_pairs_the_differences(tmp_path, cli):
    recipe = tmp_path / "theirs.yaml"
    recipe.write_text("lr: 1.0e-5\nscheduler: constant\nwarmup_ratio: 0.0\n")
    out = tmp_path / "post"
    code, err = cli(report.main, TINY + ["--unit", "post", "--encoding", "post", "--max_length", "96", "--cv_folds",
                                         "2", "--seeds", "3", "--output_dir", out, "--mlflow", "false",
                                         "--compare", recipe])
    assert code == 0, err
    theirs_dir = out / "vs-theirs"
    ours, theirs = (report.json.loads((d / "summary.json").read_text()) for d in (out, theirs_dir))
    for k in (0, 1):  # the same folds: the same test posts
        assert (out / "splits" / f"fold{k}.json").read_text() == (theirs_dir / "splits" / f"fold{k}.json").read_text()
    saved = report.load_yaml_config(theirs_dir / "fold0-seed3" / "config.yaml")
    assert (saved["lr"], saved["scheduler"], saved["unit"], saved["tiny_hidden"], saved["seed"]) == \
        (1e-5, "constant", "post", 16, 3)  # the file's keys on top of this report's flags
    cmp = report.json.loads((out / "compare-theirs.json").read_text())
    assert cmp["runs"] == ["fold0-seed3", "fold1-seed3"]
    d = [a["metrics"]["paper_macro_f1"] - b["metrics"]["paper_macro_f1"] for a, b in zip(ours["runs"], theirs["runs"])]
    row = cmp["metrics"]["paper_macro_f1"]
    assert row["per_run"] == [round(v, 4) for v in d] and row["difference"] == pytest.approx(np.mean(d))
    ratio = np.mean([f["test"] / f["train"] for f in ours["folds"]])
    assert (row["ci_corrected_low"], row["ci_corrected_high"]) == pytest.approx(intervals.corrected_t_ci(d, ratio))
    psy = [a["per_symptom"]["paper_per_symptom"]["PSYCHOMOTOR"] for a in ours["runs"]]
    assert cmp["per_label"]["paper_per_symptom"]["PSYCHOMOTOR"]["ours"] == pytest.approx(np.mean(psy))
    md = (out / "compare-theirs.md").read_text()
    assert "| metric | majority class | bag-of-words LR | theirs | ours | ours - theirs [corrected 95% CI] |" in md
    assert f" | {row['theirs']:.3f} | {row['ours']:.3f} | {row['difference']:+.3f} [" in md
    code, err = cli(report.main, TINY + ["--output_dir", tmp_path / "x", "--compare", tmp_path / "missing.yaml"])
    assert code == 2 and "missing.yaml" in err and not (tmp_path / "x").exists()  # refused before any training


def test_cv_run_writes_summary_plots_and_nested_mlflow_runs(tmp_path, cli):
    out = tmp_path / "cv"
    code, err = cli(report.main, TINY + ["--cv_folds", "2", "--seeds", "1", "--output_dir", out,
                                         "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0, err
    md = (out / "summary.md").read_text()
    assert md.startswith("# criteria: 2-fold cross-validation (grouped by post, stratified) x 1 seed(s)")
    assert "| metric | model | 95% CI | corrected 95% CI | majority class | bag-of-words LR |" in md
    assert sum(line.startswith("| f1_macro | ") for line in md.splitlines()) == 2  # test, test_shift
    assert "| f1_macro_at_val_threshold |" in md
    assert "at each run's one validation-chosen threshold, pooled over the criteria" in md  # not paper_*_tuned's cuts
    assert "| FATIGUE |" in md and "| all |" in md and "| fold1-seed1 |" in md
    result = report.json.loads((out / "summary.json").read_text())
    assert [(r["fold"], r["seed"]) for r in result["runs"]] == [(0, 1), (1, 1)]
    f1 = [r["metrics"]["f1_macro"] for r in result["runs"]]
    assert result["summary"]["model"]["f1_macro"]["mean"] == pytest.approx(np.mean(f1))
    assert result["summary"]["majority class"]["auroc"]["mean"] == 0.5
    test_posts = [set(report.json.loads((out / "splits" / f"fold{k}.json").read_text())["test"]) for k in (0, 1)]
    assert not test_posts[0] & test_posts[1]
    pngs = [out / f for f in ("training.png", "confusion.png", "pr_roc.png", "per_criterion.png")] + \
           [out / "fold0-seed1" / f for f in ("training.png", "confusion.png", "pr_roc.png")]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    for png in pngs[:4]:  # the summary's own figures, linked from summary.md
        assert f"]({png.name})" in md, png
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("redsm5").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["criteria-fold0-seed1", "criteria-fold1-seed1"]
    assert parent.data.metrics["f1_macro_mean"] == pytest.approx(np.mean(f1))
    shift_f1 = [r["shift_metrics"]["f1_macro"] for r in result["runs"]]  # each fold's model on the one shifted set
    assert result["summary_test_shift"]["model"]["f1_macro"]["mean"] == pytest.approx(np.mean(shift_f1))
    assert set(result["summary_test_shift"]) == {"model", "majority class", "bag-of-words LR"}
    assert "## Shifted test set (test_shift)" in md and parent.data.metrics["test_shift_f1_macro_mean"] == \
        pytest.approx(np.mean(shift_f1))
    assert {"summary.md", "summary.json", "pr_roc.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"plots/confusion.png", "plots/training.png"} <= {
        a.path for a in client.list_artifacts(children[0].info.run_id, "plots")}


def test_resume_reads_finished_runs_back_and_continues_the_rest(tmp_path, cli, monkeypatch):
    out = tmp_path / "cv"
    argv = TINY + ["--cv_folds", "2", "--seeds", "1", "--output_dir", out, "--mlflow", "false"]
    code, err = cli(report.main, argv)
    assert code == 0, err
    first = report.json.loads((out / "summary.json").read_text())
    for f in ("history.json", "metrics.json"):  # fold 1 died after its last training state was saved
        (out / "fold1-seed1" / f).unlink()
    saved = out / "fold0-seed1" / "config.yaml"  # fold 0 ran before a field was added: it ran at its default
    saved.write_text("".join(line for line in saved.read_text().splitlines(True)
                             if not line.startswith("criterion_weights:")))
    calls, real_train = [], report.runner.run

    def train_and_record(cfg, **kwargs):
        calls.append((cfg.output_dir, cfg.resume))
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(report.runner, "run", train_and_record)
    code, err = cli(report.main, argv + ["--resume", "true"])
    assert code == 0, err
    assert calls == [(str(out / "fold1-seed1"), True)]  # fold 0 read back, fold 1 resumed
    again = report.json.loads((out / "summary.json").read_text())
    timeless = lambda runs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]  # noqa: E731
    assert timeless(again["runs"]) == timeless(first["runs"]) and again["summary"] == first["summary"]
    assert again["runs"][0]["train_seconds"] == first["runs"][0]["train_seconds"]  # fold 0 read back as it was
    code, err = cli(report.main, argv + ["--resume", "true", "--lr", "0.01"])
    assert code == 2 and "fold0-seed1: trained with other settings (lr 0.002 -> 0.01)" in err.splitlines()[-1], err
    import shutil

    shutil.rmtree(out / "fold1-seed1" / "checkpoints")  # fold 1 died before its first training state was saved
    (out / "fold1-seed1" / "metrics.json").unlink()
    calls.clear()
    code, err = cli(report.main, argv + ["--resume", "true"])
    assert code == 0, err
    assert calls == [(str(out / "fold1-seed1"), False)]  # trained again, from the start, in its own folder
    assert timeless(report.json.loads((out / "summary.json").read_text())["runs"]) == timeless(first["runs"])
    calls.clear()  # fold 1 was trained again with overwrite_output_dir, and its config.yaml says so
    code, err = cli(report.main, argv + ["--resume", "true"])
    assert code == 0 and calls == [], err  # both read back: how a folder was entered is not a setting of the run


def test_resume_of_a_moved_report_folder(tmp_path, cli, monkeypatch):
    """A report folder copied elsewhere (another disk, a colleague's machine) resumes there: its finished folds
    are read back and a fold that stopped midway goes on, though config.yaml names the old paths (it was refused:
    'trained with other settings (splits_file ... -> ...)')."""
    import shutil

    out, moved = tmp_path / "cv", tmp_path / "elsewhere" / "cv"
    argv = TINY + ["--cv_folds", "2", "--seeds", "1", "--mlflow", "false"]
    code, err = cli(report.main, argv + ["--output_dir", out])
    assert code == 0, err
    first = report.json.loads((out / "summary.json").read_text())
    shutil.copytree(out, moved)
    for f in ("history.json", "metrics.json"):  # fold 1 of the copy stopped after its last training state
        (moved / "fold1-seed1" / f).unlink()
    calls, real_train = [], report.runner.run
    monkeypatch.setattr(report.runner, "run", lambda cfg, **kw: calls.append(cfg.output_dir) or real_train(cfg, **kw))
    code, err = cli(report.main, argv + ["--output_dir", moved, "--resume", "true"])
    assert code == 0, err
    assert calls == [str(moved / "fold1-seed1")]  # fold 0 read back where it is now, fold 1 resumed
    again = report.json.loads((moved / "summary.json").read_text())
    placeless = lambda runs: [{k: v for k, v in r.items() if k not in ("train_seconds", "output_dir")}  # noqa: E731
                              for r in runs]
    assert placeless(again["runs"]) == placeless(first["runs"]) and again["summary"] == first["summary"]
    (moved / "fold0-seed1" / "splits.json").write_text(report.json.dumps({"train": [], "val": [], "test": []}))
    code, err = cli(report.main, argv + ["--output_dir", moved, "--resume", "true"])
    assert code == 2 and "fold0-seed1: trained with other settings (splits_file" in err, err  # another split


@pytest.mark.parametrize("argv, needle", [
    (["--cv_folds", "0"], "--cv_folds: must be >= 1"),
    (["--cv_folds", "40", "--demo_posts", "40"], "--cv_folds: must be 1 or between 2 and 20"),
    # scikit-learn's ValueError from the stratified folds was a traceback (issue 31)
    (["--cv_folds", "40", "--demo_posts", "120"], "--cv_folds: at most 35 on this corpus (folds are stratified"),
    (["--cv_folds", "1", "--demo_posts", "30", "--test_ratio", "0.01"],
     "--cv_folds 1: the test posts of fold 0 (1) have no examples for task 'criteria'"),
    (["--seeds", "one"], "--seeds: invalid int value: 'one'"),
    (["--n_bootstrap", "5"], "--n_bootstrap: must be between 100 and 1,000,000, got 5"),
    (["--cv_fold", "3"], "did you mean --cv_folds?"),
])
def test_bad_flags_are_one_line_errors(cli, tmp_path, argv, needle):
    code, err = cli(report.main, argv + ["--mlflow", "false", "--output_dir", tmp_path])
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and needle in lines[-1] and "Traceback" not in err, err


def test_hpo_study_missing_is_a_user_error(cli, tmp_path):
    code, err = cli(report.main, ["--hpo_study", "nope", "--storage", f"sqlite:///{tmp_path}/optuna.db"])
    assert code == 2 and err.strip().splitlines()[-1] == \
        f"error: --hpo_study: no study 'nope' in sqlite:///{tmp_path}/optuna.db", err
