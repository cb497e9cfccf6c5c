"""Ablation tables that cannot mislead: bootstrap intervals over test posts and seeds, paired Δ and
best / tied marks (fuse/ablate/stats.py), the linear-probe baseline (fuse/ablate/probe.py), the
best-config analysis of an --lrs grid, and the probe/interval/Δ columns in every table format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mmcache.fuse.ablate as ab
import numpy as np
import pytest
from mmcache.fuse.ablate import best as best_mod
from mmcache.fuse.ablate import probe as probe_mod
from mmcache.fuse.ablate import stats
from mmcache.fuse.metrics import compute_metrics
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError, PipelineError

TINY = TrainConfig(dim=8, heads=2, epochs=1, batch_size=16, eval_batch_size=64, lr=3e-3, patience=0, device="cpu",
                   threads=1)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """300 posts (60 test), a clear signal: the probe has something to find."""
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=300, dt=8, di=8, lt=4, li=3, signal=0.5)
    return root


def _test_posts(cache: Path, dataset: str = "synth") -> tuple[list[str], np.ndarray, list[str]]:
    idx = cf.read_index(cache / dataset / cf.INDEX_NAME)
    test = [i for i, s in enumerate(idx.splits) if s == "test"]
    return [str(idx.ids[i]) for i in test], np.asarray(idx.labels)[test], list(idx.classes)


def _fabricate(run: ab.GridRun, ids: list[str], y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
               val_macro_f1: float = 0.5) -> None:
    """A finished run with these test predictions (predictions.csv, and metrics.json computed from it)."""
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))
    test = compute_metrics(y_true, y_pred, classes)
    (run.run_dir / "metrics.json").write_text(json.dumps(
        {"test": test, "val": {"macro_f1": val_macro_f1}, "seconds": 1.0, "model": {"num_parameters": 10},
         "best_epoch": 1, "epochs_run": 1}))
    lines = ["id,true,predicted," + ",".join(f"p_{c}" for c in classes)]
    for sid, t, p in zip(ids, y_true, y_pred, strict=True):
        probs = ",".join("1.0" if k == p else "0.0" for k in range(len(classes)))
        lines.append(f"{sid},{classes[t]},{classes[p]},{probs}")
    (run.run_dir / "predictions.csv").write_text("\n".join(lines) + "\n")


def _noisy(y: np.ndarray, wrong: float, seed: int) -> np.ndarray:
    """``y`` with a fraction ``wrong`` of the posts moved to the next class."""
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < wrong
    return np.where(flip, (y + 1) % 3, y)


# --------------------------------------------------------------------------------------------- marks

def test_identical_heads_are_tied_and_a_clear_gap_wins(cache, tmp_path):
    ids, y, classes = _test_posts(cache)
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only", "basic", "image_only"], features=["cls"],
                          seeds=2, cache_dir=cache, runs_dir=tmp_path / "runs")
    for r in runs:  # text_only and basic: the same predictions; image_only far worse
        wrong = 0.6 if r.head == "image_only" else 0.1
        _fabricate(r, ids, y, _noisy(y, wrong, seed=r.seed), classes)
    table = ab.aggregate(runs, baseline="text_only")["synth"]
    rows = {r["head"]: r for r in table["rows"]}
    for k in ab.METRICS:
        assert rows["text_only"][f"tied_{k}"] and rows["basic"][f"tied_{k}"]
        assert not any(r[f"best_{k}"] for r in rows.values())  # nothing bold when the top is tied
        assert not rows["image_only"][f"tied_{k}"]
    assert rows["basic"]["delta"]["macro_f1"] == {"delta": 0.0, "ci": [0.0, 0.0]}
    assert rows["image_only"]["delta"]["macro_f1"]["ci"][1] < 0 and rows["text_only"]["delta"]["is_baseline"]
    text = ab.format_tables({"synth": table})
    assert " ~" in text and " *" not in text.split("(test split")[0]

    # a clear gap: the top row is marked best, the other neither best nor tied
    clear = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only", "basic"], features=["cls"], seeds=2,
                           cache_dir=cache, runs_dir=tmp_path / "clear")
    for r in clear:
        _fabricate(r, ids, y, _noisy(y, 0.05 if r.head == "basic" else 0.5, seed=r.seed), classes)
    rows = {r["head"]: r for r in ab.aggregate(clear)["synth"]["rows"]}
    assert rows["basic"]["best_macro_f1"] and not rows["basic"]["tied_macro_f1"]
    assert not rows["text_only"]["best_macro_f1"] and not rows["text_only"]["tied_macro_f1"]
    md = ab.tables._markdown(ab.aggregate(clear)["synth"])
    assert md.count("| **") == len(ab.METRICS)  # one bold cell per metric: basic's


def test_n_scored_and_dropped_per_row(cache, tmp_path):
    ids, y, classes = _test_posts(cache)
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only"], features=["cls"], seeds=1,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    _fabricate(runs[0], ids[5:], y[5:], y[5:], classes)  # 5 test posts never scored (dropped)
    row = ab.aggregate(runs)["synth"]["rows"][0]
    assert (row["n_test"], row["n_dropped"]) == (len(ids) - 5, 5)
    assert row["accuracy"]["ci"] == [1.0, 1.0]


# --------------------------------------------------------------------------------------------- --lrs analysis

def test_lrs_grid_analysis_reads_the_kept_lr(cache, tmp_path, monkeypatch):
    ids, y, classes = _test_posts(cache)
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["basic"], features=["cls"], seeds=2, lrs=[1e-3, 3e-3],
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    for r in runs:  # the second lr wins on validation (the old code analysed seed 0 of the first)
        _fabricate(r, ids, y, _noisy(y, 0.2, seed=r.seed), classes, val_macro_f1=0.7 if r.config.lr == 3e-3 else 0.3)
    table = ab.aggregate(runs)["synth"]
    assert table["rows"][0]["lr"] == 3e-3
    seen = []

    def spy(run_dir, **kw):  # stands in for the heavy analysis: records which run it was given
        seen.append(Path(run_dir))
        raise PipelineError("not analysed in this test")

    monkeypatch.setattr(best_mod, "analyze_run", spy)
    a = best_mod.analyze_best(table)
    assert len(seen) == 1 and json.loads((seen[0] / "config.json").read_text())["lr"] == 3e-3
    assert a["lr"] == 3e-3 and a["seed"] == 0 and "lr 0.003" in best_mod.markdown_section(a)[0]


# --------------------------------------------------------------------------------------------- probe

def test_probe_is_deterministic_beats_chance_and_is_in_every_format(cache, tmp_path, monkeypatch):
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only"], features=["cls", "tokens"], seeds=1,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    one = ab.aggregate(runs, probe=True)["synth"]
    two = ab.aggregate(runs, probe=True)["synth"]
    probes = [r for r in one["rows"] if r["kind"] == "probe"]
    assert [r["head"] for r in probes] == ["probe (text)", "probe (image)", "probe (text+image)"] * 2
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds_mean"} for r in rows]  # noqa: E731
    assert timeless(probes) == timeless([r for r in two["rows"] if r["kind"] == "probe"])
    assert all(r["macro_f1"]["mean"] > 0.6 for r in probes)  # chance is ~0.33 on 3 balanced classes
    assert any(r["macro_f1"]["mean"] < 1 for r in probes)  # not a trivial task: the C sweep matters
    assert all(r["C"]["label"] in probe_mod.PROBE_CS for r in probes)
    # a Δ against the best probe of the same features, with its paired interval
    head = next(r for r in one["rows"] if r["kind"] == "measured")
    assert head["delta"] is None  # the head never finished: no predictions, no Δ
    paths = ab.write_results({"synth": one}, tmp_path / "res", plots=False)["synth"]
    md, csv_text, js, tex = (p.read_text() for p in paths[:4])
    assert paths[3].suffix == ".tex" and "\\toprule" in tex and "probe (text+image)" in tex
    body = [line for line in tex.splitlines() if line.endswith("\\\\")]
    spec = tex.split("\\begin{tabular}{")[1].split("}")[0]
    assert len(body) == 1 + 2 + 6 and all(line.count(" & ") == len(spec) - 1 for line in body)  # header, 2 heads, 6 probes
    assert "| probe (text+image), C=" in md and "probe (text+image)" in csv_text
    assert [r["kind"] for r in csv.DictReader(paths[1].open())].count("probe") == 6
    assert sum(r["kind"] == "probe" for r in json.loads(js)["rows"]) == 6

    # cached by data fingerprint: a second aggregation with the cache folder does not refit
    fits = []
    real = probe_mod._fit_group
    monkeypatch.setattr(probe_mod, "_fit_group", lambda run: (fits.append(run.features), real(run))[1])
    first = ab.aggregate(runs, probe=True, probe_dir=tmp_path / "probe")["synth"]
    again = ab.aggregate(runs, probe=True, probe_dir=tmp_path / "probe")["synth"]
    assert fits == ["cls", "tokens"] and first["rows"] == again["rows"]


def test_probe_scores_exactly_the_heads_samples(tmp_path):
    root = tmp_path / "cache"
    make_cache(root, "holes", n=100, dt=8, di=8, lt=4, li=3, image_invalid=(1, 85, 90), text_invalid=(2, 95))
    runs = ab.expand_grid(TINY, datasets=["holes"], heads=["text_only"], features=["tokens"], seeds=1,
                          cache_dir=root, runs_dir=tmp_path / "runs")
    ab.run_grid(runs, threads=1)
    table = ab.aggregate(runs, probe=True)["holes"]
    head = next(r for r in table["rows"] if r["kind"] == "measured")
    metrics = json.loads((runs[0].run_dir / "metrics.json").read_text())
    run_ids = {r["id"] for r in csv.DictReader((runs[0].run_dir / "predictions.csv").open())}
    for row in table["rows"]:  # the text probe drops the image-less posts too, as the heads do
        assert (row["n_test"], row["n_dropped"]) == (metrics["test"]["n"], 3) == (17, 3)
    recs, _ = probe_mod.probe_records(runs, None)
    assert all({r["id"] for r in csv.DictReader(x["predictions_csv"].splitlines())} == run_ids for x in recs)
    assert head["delta"]["vs"].startswith("probe (")


# --------------------------------------------------------------------------------------------- bootstrap

def _row(n: int, acc: float, seeds: int = 3, seed: int = 0) -> stats.RowPredictions:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random((seeds, n)) < acc, y, (y + 1 + rng.integers(0, 2, (seeds, n))) % 3)
    return stats.RowPredictions([y], [pred], [3])


def test_point_scores_match_the_metrics_module():
    r = _row(200, 0.7)
    point = stats.point_scores(r)
    per_seed = [compute_metrics(r.y_true[0], p, ["a", "b", "c"]) for p in r.y_pred[0]]
    for k in ab.METRICS:
        assert point[k] == pytest.approx(np.mean([m[k] for m in per_seed]))


@pytest.mark.parametrize("acc", [0.4, 0.7, 0.9])
def test_intervals_contain_the_estimate_shrink_with_n_and_are_deterministic(acc):
    widths = []
    for n in (100, 400, 1600):
        r = _row(n, acc, seed=n)
        reps = stats.table_replicates([r], b=1000, seed=0)[0]
        point = stats.point_scores(r)
        for k in ab.METRICS:
            lo, hi = stats.interval(reps[k])
            assert lo <= point[k] <= hi
        widths.append(np.subtract(*stats.interval(reps["accuracy"])[::-1]))
        again = stats.table_replicates([r], b=1000, seed=0)[0]
        assert all(np.array_equal(reps[k], again[k]) for k in ab.METRICS)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~ 1 / sqrt(n)


def test_seed_spread_widens_the_interval():
    """Seeds that disagree add their spread to the post-sampling noise (the hierarchical part)."""
    n = 400
    same = _row(n, 0.7, seeds=1)
    y = same.y_true[0]
    spread = stats.RowPredictions([y], [np.stack([same.y_pred[0][0], np.where(np.arange(n) < 120, y, (y + 1) % 3),
                                                  y])], [3])
    w = [np.subtract(*stats.interval(stats.table_replicates([r])[0]["accuracy"])[::-1]) for r in (same, spread)]
    assert w[1] > w[0]


# --------------------------------------------------------------------------------------------- end to end

def test_demo_tables_have_probes_intervals_deltas_and_marks(tmp_path, capsys):
    args = ["demo", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--n", "60", "--seeds", "1", "--epochs", "1",
            "--jobs", "1", "--no-plots"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "probe (text+image)" in out and "Δ macro-F1 vs baseline" in out
    table = json.loads((tmp_path / "results" / "ablation_demo.json").read_text())
    _check_table(table)
    assert (tmp_path / "results" / "ablation_demo.tex").is_file()


def _check_table(table: dict) -> None:
    probes = [r for r in table["rows"] if r["kind"] == "probe"]
    heads = [r for r in table["rows"] if r["kind"] == "measured" and r["seeds_finished"]]
    assert probes and heads
    for r in probes + heads:
        lo, hi = r["macro_f1"]["ci"]
        assert lo <= r["macro_f1"]["mean"] <= hi and r["n_test"] > 0
        assert r["delta"] is not None and len(r["delta"]["macro_f1"]["ci"]) == 2
    marked = [r for r in table["rows"] if r["best_macro_f1"] or r["tied_macro_f1"]]
    assert marked and table["marks"]["macro_f1"]["decision"] in ("best", "tied")


@pytest.mark.shared_data
@pytest.mark.slow
def test_mvsa_single_sample_tables(tmp_path, capsys):
    data = DATA / "mvsa_single_sample"
    if not data.is_dir():
        pytest.skip(f"{data} is absent")
    from mmcache.extract import tiny_models as tm

    text = tm.build_bert(tmp_path / "m" / "bert", hidden_size=16, num_heads=2, seed=1)
    image = tm.build_dinov2(tmp_path / "m" / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32, seed=2)
    assert cli.main(["extract", "-d", "mvsa_single", "--data-dir", str(data), "--text-model", str(text),
                     "--image-model", str(image), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0",
                     "--batch-size", "64", "--no-progress"]) == 0
    assert cli.main(["ablate", "-d", "mvsa_single", "--heads", "text_only,basic", "--features", "cls", "--seeds", "2",
                     "--epochs", "2", "--dim", "8", "--device", "cpu", "--jobs", "1", "--no-plots",
                     "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
                     "--results-dir", str(tmp_path / "results")]) == 0
    table = json.loads((tmp_path / "results" / "ablation_mvsa_single.json").read_text())
    _check_table(table)
    assert table["reference"]["published"] == {"accuracy": "0.73"} and "another test set" in table["reference"]["scored_on"]
    md = (tmp_path / "results" / "ablation_mvsa_single.md").read_text()
    assert "| 0.73 |" in md and "agree vs disagree" in md


def test_a_perfect_predictor_has_a_point_interval():
    """A draw that misses a class entirely must not count that class's F1 as 0 (which would put a perfect
    predictor's macro-F1 interval down at 2/3 on small test sets)."""
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])  # class 2 is missed by ~1/3 of the draws
    reps = stats.table_replicates([stats.RowPredictions([y], [y[None, :]], [3])])[0]
    assert all(stats.interval(reps[k]) == [1.0, 1.0] for k in ab.METRICS)


def test_probe_and_intervals_on_a_task_of_two_targets(tmp_path):
    """A task (several targets, missing labels masked): one probe per member, the task score the mean of
    the members' macro-F1, intervals computed per member and averaged."""
    n = 200
    make_cache(tmp_path / "c", "memotion", n=n, dt=8, di=8, lt=3, li=2, signal=1.0,
               targets={"humour_b": (["a", "b"], [i % 2 if i % 7 else -1 for i in range(n)]),
                        "sarcasm_b": (["a", "b"], [(i // 2) % 2 for i in range(n)])},
               tasks={"task_b": ["humour_b", "sarcasm_b"]})
    runs = ab.expand_grid(TINY, heads=["basic"], features=["cls"], seeds=1, cache_dir=tmp_path / "c",
                          runs_dir=tmp_path / "runs", targets=["task_b"])
    ab.run_grid(runs, threads=1)
    table = ab.aggregate(runs, probe=True)["memotion-task_b"]
    probes = [r for r in table["rows"] if r["kind"] == "probe"]
    assert len(probes) == 3 and all(set(r["C"]) == {"humour_b", "sarcasm_b"} for r in probes)
    for r in table["rows"]:
        assert r["macro_f1"]["mean"] == pytest.approx(np.mean([r["targets"][t]["mean"] for t in r["targets"]]))
        lo, hi = r["macro_f1"]["ci"]
        assert lo <= r["macro_f1"]["mean"] <= hi
    assert table["references"][0]["published"] == {"macro_f1": "0.51"}
    assert "| 0.51 |" in ab.tables._markdown(table) and "1,878 memes" in ab.tables._latex(table)


def test_bad_bootstrap_count_is_refused_before_training(cache, tmp_path):
    with pytest.raises(BadInputError, match="bootstrap"):
        ab.run_ablation(ab.AblationConfig(datasets=["synth"], heads=["text_only"], features=["cls"], seeds=1,
                                          base=TINY, cache_dir=str(cache), runs_dir=str(tmp_path / "runs"),
                                          bootstrap=0, plots=False))
    assert not (tmp_path / "runs").exists()
