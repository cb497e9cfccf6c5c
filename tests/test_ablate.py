"""Batch ablations (fuse/ablate.py) on synthetic caches written with the real cache writer: grid
expansion, reuse and resume, sharding, aggregation math, failures, the MVSA agree/disagree split, the
`ablate` CLI and --jobs 2 == --jobs 1."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import mmcache.fuse.ablate as ab
import numpy as np
import pytest
from mmcache.fuse.heads import list_heads
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError, CacheError

TINY = TrainConfig(dim=8, heads=2, epochs=1, batch_size=16, eval_batch_size=64, lr=3e-3, patience=0, device="cpu")
TINY_FLAGS = ["--dim", "8", "--epochs", "1", "--batch-size", "16", "--lr", "3e-3", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    """synth (one encoder pair) and multi (two text files: the encoder axis has two values)."""
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=3)
    make_cache(root, "multi", n=40, dt=8, di=8, lt=4, li=3, seed=1, extra_text_files=1)
    return root


def _grid(caches, tmp_path, **kw):
    args = dict(datasets=["synth"], heads=["text_only", "basic"], features=["cls"], seeds=2, cache_dir=caches,
                runs_dir=tmp_path / "runs")
    args.update(kw)
    return ab.expand_grid(TINY, **args)


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = ab.execute.train

    def counting(config, data=None, **kw):
        calls.append(config.run_name)
        return real(config, data=data, **kw)

    monkeypatch.setattr(ab.execute, "train", counting)
    return calls


# --------------------------------------------------------------------------------------------- grid

def test_grid_expansion_counts_and_encoder_axis(caches, tmp_path):
    runs = ab.expand_grid(TINY, cache_dir=caches, runs_dir=tmp_path / "runs")  # defaults: every dataset
    heads = len(list_heads())
    # synth: 1 encoder pair; multi: 2 text files x 1 image file -> 2 pairs; 5 heads x (cls, tokens) x 5 seeds
    assert len(runs) == (1 + 2) * heads * 2 * 5
    assert {r.dataset for r in runs} == {"synth", "multi"}
    assert {r.encoder.label for r in runs if r.dataset == "multi"} == {
        "tiny/text-enc + tiny/image-enc", "tiny/text-enc-v2 + tiny/image-enc"}
    assert {r.seed for r in runs} == set(range(5)) and {r.features for r in runs} == {"cls", "tokens"}
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) and len({r.key for r in runs}) == len(runs)
    assert runs == sorted(runs, key=ab.GridRun.sort_key)
    r = runs[0]
    assert r.run_dir == tmp_path / "runs" / r.dataset / r.name
    assert r.name == f"{r.head}-{r.features}-{r.encoder.tag}-s{r.seed}-{r.key}"
    assert r.config.modalities == ["text", "image"] and r.config.run_name == r.name
    # the key is stable and ignores where runs go and how many threads they use
    again = ab.expand_grid(TINY.__class__(**{**TINY.to_dict(), "threads": 3}), cache_dir=caches,
                           runs_dir=tmp_path / "elsewhere")
    assert [x.key for x in again] == [x.key for x in runs]
    # ... but not the training settings
    other = ab.expand_grid(TrainConfig(**{**TINY.to_dict(), "lr": 1e-3}), cache_dir=caches, runs_dir=tmp_path)
    assert not {x.key for x in other} & {x.key for x in runs}


def test_grid_bad_input(caches, tmp_path):
    with pytest.raises(BadInputError, match="unknown head"):
        _grid(caches, tmp_path, heads=["nope"])
    with pytest.raises(BadInputError, match="unknown features"):
        _grid(caches, tmp_path, features=["pixels"])
    with pytest.raises(CacheError, match="no cache for dataset"):
        _grid(caches, tmp_path, datasets=["absent"])
    with pytest.raises(CacheError, match="no dataset cache"):
        ab.expand_grid(TINY, cache_dir=tmp_path / "empty")


def test_sharding_covers_every_config_exactly_once(caches, tmp_path):
    runs = ab.expand_grid(TINY, cache_dir=caches, runs_dir=tmp_path)
    for n in (1, 3, 7):
        parts = [ab.shard_runs(runs, (i, n)) for i in range(n)]
        names = [r.name for p in parts for r in p]
        assert sorted(names) == sorted(r.name for r in runs)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(BadInputError):
        ab.shard_runs(runs, (3, 3))


# --------------------------------------------------------------------------------------------- running

def test_reuse_resume_and_force(caches, tmp_path, count_trainings):
    runs = _grid(caches, tmp_path)
    out = ab.run_grid(runs, threads=1)
    assert len(count_trainings) == len(runs) == 4 and not out["failed"]
    assert all(ab.run_status(r) == "finished" for r in runs)

    count_trainings.clear()
    out = ab.run_grid(runs, threads=1)  # everything finished: nothing trains
    assert count_trainings == [] and len(out["reused"]) == 4

    # an interrupted run: its folder lacks metrics.json -> removed and rerun, the others reused
    victim = runs[2]
    (victim.run_dir / "metrics.json").unlink()
    (victim.run_dir / "stale.txt").write_text("left by the crash")
    assert ab.run_status(victim) == "unfinished"
    out = ab.run_grid(runs, threads=1)
    assert count_trainings == [victim.name] and len(out["reused"]) == 3
    assert not (victim.run_dir / "stale.txt").exists() and ab.run_status(victim) == "finished"

    count_trainings.clear()
    ab.run_grid(runs, threads=1, force=True)
    assert sorted(count_trainings) == sorted(r.name for r in runs)


def test_interrupted_grid_picks_up_where_it_stopped(caches, tmp_path, monkeypatch):
    runs = _grid(caches, tmp_path, seeds=3)
    real, calls = ab.execute.train, []

    def interrupted(config, data=None, **kw):
        calls.append(config.run_name)
        if len(calls) == 4:  # Ctrl-C in the middle of the 4th run: its folder exists, unfinished
            Path(config.runs_dir, config.run_name).mkdir(parents=True)
            raise KeyboardInterrupt
        return real(config, data=data, **kw)

    monkeypatch.setattr(ab.execute, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ab.run_grid(runs, threads=1)
    assert [ab.run_status(r) for r in runs].count("finished") == 3
    monkeypatch.setattr(ab.execute, "train", real)
    calls.clear()
    monkeypatch.setattr(ab.execute, "train", lambda c, data=None, **kw: (calls.append(c.run_name), real(c, data=data, **kw))[1])
    out = ab.run_grid(runs, threads=1)
    assert calls == [r.name for r in runs[3:]] and len(out["reused"]) == 3


def test_group_data_loaded_once_with_both_modalities(caches, tmp_path, monkeypatch):
    loads = []
    real = ab.execute.load_data

    def counting(*a, **kw):
        loads.append((kw["features"], tuple(kw["modalities"])))
        return real(*a, **kw)

    monkeypatch.setattr(ab.execute, "load_data", counting)
    runs = _grid(caches, tmp_path, heads=["text_only", "image_only", "basic"], features=["cls", "mean"])
    ab.run_grid(runs, threads=1)
    assert loads == [("cls", ("text", "image")), ("mean", ("text", "image"))]
    # every head of a group saw the same samples
    samples = {json.loads((r.run_dir / "metrics.json").read_text())["samples"]["test"] for r in runs}
    assert len(samples) == 1


def test_failed_run_is_reported_not_fatal(caches, tmp_path, monkeypatch):
    runs = _grid(caches, tmp_path)
    real = ab.execute.train

    def flaky(config, data=None, **kw):
        if config.head == "basic" and config.seed == 1:
            raise RuntimeError("injected failure")
        return real(config, data=data, **kw)

    monkeypatch.setattr(ab.execute, "train", flaky)
    out = ab.run_grid(runs, threads=1)
    bad = next(r for r in runs if r.head == "basic" and r.seed == 1)
    assert out["failed"] == {bad.name: "RuntimeError: injected failure"} and len(out["trained"]) == 3
    assert ab.run_status(bad) == "failed"
    table = ab.aggregate(runs)["synth"]
    row = next(r for r in table["rows"] if r["head"] == "basic")
    assert (row["seeds_finished"], row["seeds_failed"], row["seeds_total"]) == (1, 1, 2)
    assert row["macro_f1"]["std"] is None and row["macro_f1"]["mean"] is not None  # one seed: no std
    assert table["counts"]["failed"] == 1
    rec = next(x for x in table["runs"] if x["run"] == bad.name)
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: injected failure"
    text = ab.format_tables({"synth": table})
    assert "1/2 (1 failed)" in text and "injected failure" in text
    # the next call retries it (the failure may have been transient)
    monkeypatch.setattr(ab.execute, "train", real)
    out = ab.run_grid(runs, threads=1)
    assert out["trained"] == [bad.name] and ab.run_status(bad) == "finished"


# --------------------------------------------------------------------------------------------- aggregation

def _fabricate(run: ab.GridRun, acc: float, macro: float, weighted: float, seconds: float, params: int = 123) -> None:
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))
    test = {"n": 8, "accuracy": acc, "macro_f1": macro, "weighted_f1": weighted,
            "confusion_matrix": [[1, 0, 0], [0, 2, 0], [0, 1, 4]]}
    (run.run_dir / "metrics.json").write_text(json.dumps(
        {"test": test, "seconds": seconds, "model": {"num_parameters": params}, "best_epoch": 1, "epochs_run": 1}))


def test_aggregation_math_against_hand_computation(caches, tmp_path):
    runs = _grid(caches, tmp_path, seeds=3)
    values = {"text_only": [(0.50, 0.40, 0.45, 1.0), (0.60, 0.50, 0.55, 2.0), (0.70, 0.30, 0.65, 3.0)],
              "basic": [(0.80, 0.20, 0.70, 4.0), (0.90, 0.25, 0.75, 6.0)]}  # basic seed 2: never ran
    for r in runs:
        if r.seed < len(values[r.head]):
            _fabricate(r, *values[r.head][r.seed])
    table = ab.aggregate(runs)["synth"]
    rows = {r["head"]: r for r in table["rows"]}
    t = rows["text_only"]
    # hand computation: mean 0.6, sample std sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1
    assert t["accuracy"]["mean"] == pytest.approx(0.6) and t["accuracy"]["std"] == pytest.approx(0.1)
    assert t["macro_f1"]["mean"] == pytest.approx(0.4) and t["macro_f1"]["std"] == pytest.approx(0.1)
    assert t["train_seconds_mean"] == pytest.approx(2.0) and t["num_parameters"] == 123
    b = rows["basic"]
    assert b["accuracy"]["mean"] == pytest.approx(0.85)
    assert b["accuracy"]["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))  # ddof=1 with two seeds
    assert b["accuracy"]["std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert (b["seeds_finished"], b["seeds_total"], b["seeds_failed"]) == (2, 3, 0)
    # fabricated runs have no predictions.csv: no interval, and no row is marked on its mean alone
    # (marks need paired intervals: tests/test_ablate_stats.py)
    assert t["accuracy"]["ci"] is None and t["n_test"] is None
    assert not any(r[f"{p}_{k}"] for r in (t, b) for p in ("best", "tied") for k in ab.METRICS)
    # confusion matrix of the best config by mean macro-F1 (text_only), summed over its 3 seeds
    assert table["confusion"]["head"] == "text_only" and table["confusion"]["seeds"] == 3
    assert table["confusion"]["matrix"] == [[3, 0, 0], [0, 6, 0], [0, 3, 12]]
    assert ab.mean_std([0.3]) == (0.3, None) and ab.mean_std([]) == (None, None)
    # terminal: best marked with *, std '-' nowhere here
    text = ab.format_tables({"synth": table})
    assert "0.8500 ± 0.0707" in text and "0.8500 ± 0.0707 *" not in text and "0.6000 ± 0.1000" in text
    assert "2/3" in text


def test_reference_row_only_where_the_paper_reports(tmp_path):
    make_cache(tmp_path / "c", "memotion", n=30, dt=8, di=8, lt=3, li=2)
    runs = ab.expand_grid(TINY, heads=["dual_attention", "basic"], features=["cls"], seeds=1,
                          cache_dir=tmp_path / "c", runs_dir=tmp_path / "runs")
    for i, r in enumerate(runs):
        _fabricate(r, 0.9, 0.9 - i / 10, 0.9, 1.0)  # measured far above the paper: the paper row never "best"
    table = ab.aggregate(runs)["memotion"]
    ref = table["reference"]
    assert ref["macro_f1"] == 0.3552 and ref["accuracy"] is None and ref["label"] == ab.REPORTED_LABEL
    paths = ab.write_results({"memotion": table}, tmp_path / "results", plots=False)["memotion"]
    md = paths[0].read_text()
    assert "dual_attention: reported (paper), not measured" in md and "0.3552" in md and "**0.8000" not in md
    rows = list(csv.DictReader(paths[1].open()))
    rep = [r for r in rows if r["kind"] == "reported"]
    assert [r["macro_f1_mean"] for r in rep] == ["0.3552", "0.35"]  # as published: the paper's; SemEval's best
    assert "1,878 memes" in rep[1]["scored_on"] and "another test set" in rep[0]["scored_on"]
    assert "| 0.35 |" in md and "0.3500" not in md and "scored on" in md
    assert all(r["best_macro_f1"] == "False" for r in rep) and "SemEval-2020 Task 8" in rep[1]["encoder"]
    assert "± -" in ab.format_tables({"memotion": table})  # one seed: std shown as '-'


def test_mvsa_agree_disagree_split(tmp_path):
    root = tmp_path / "c"
    make_cache(root, "mvsa_single", n=60, dt=8, di=8, lt=3, li=2)
    idx_path = root / "mvsa_single" / cf.INDEX_NAME
    idx = cf.read_index(idx_path)
    agree = [int(i % 3 != 0) for i in range(len(idx))]  # every 3rd post: text and image labels disagree
    cf.write_index(idx_path, dataset="mvsa_single", classes=list(idx.classes), ids=list(idx.ids),
                   labels=idx.labels.tolist(), splits=list(idx.splits), texts=list(idx.texts),
                   image_paths=list(idx.image_paths),
                   extra={"text_label": idx.labels.tolist(), "image_label": idx.labels.tolist(), "labels_agree": agree})
    runs = ab.expand_grid(TINY, heads=["basic"], features=["cls"], seeds=2, cache_dir=root, runs_dir=tmp_path / "runs")
    ab.run_grid(runs, threads=1)
    table = ab.aggregate(runs)["mvsa_single"]
    assert table["mvsa_agreement"] and table["reference"]["accuracy"] == 0.73
    row = table["rows"][0]
    # hand computation from each run's predictions.csv
    by_id = dict(zip(idx.ids, agree, strict=True))
    for part, want in (("agree", 1), ("disagree", 0)):
        accs = []
        for r in runs:
            preds = [p for p in csv.DictReader((r.run_dir / "predictions.csv").open()) if by_id[p["id"]] == want]
            accs.append(np.mean([p["true"] == p["predicted"] for p in preds]))
            n = len(preds)
        assert row[part]["n"] == n > 0
        assert row[part]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert row[part]["accuracy"]["std"] == pytest.approx(statistics.stdev(accs))
    assert row["agree"]["n"] + row["disagree"]["n"] == json.loads((runs[0].run_dir / "metrics.json").read_text())["test"]["n"]
    text = ab.format_tables({"mvsa_single": table})
    assert "agree vs disagree" in text
    paths = ab.write_results({"mvsa_single": table}, tmp_path / "res", plots=False)["mvsa_single"]
    assert "disagree_accuracy_mean" in paths[1].read_text().splitlines()[0]
    assert "## Text and image labels agree vs disagree" in paths[0].read_text()


# --------------------------------------------------------------------------------------------- CLI

def _cli(caches, tmp_path, *extra) -> int:
    return cli.main(["ablate", "--cache-dir", str(caches), "--runs-dir", str(tmp_path / "runs"),
                     "--results-dir", str(tmp_path / "results"), *TINY_FLAGS, *extra])


def test_cli_writes_tables_and_aggregate_only(caches, tmp_path, capsys, count_trainings):
    rc = _cli(caches, tmp_path, "-d", "synth", "--heads", "text_only,basic", "--heads", "dual_attention",
              "--features", "cls", "--seeds", "2", "--jobs", "1", "--no-plots", "--no-stack")
    out = capsys.readouterr().out
    assert rc == 0 and len(count_trainings) == 6  # one model per run (stacking: tests/test_stack.py)
    assert "6 runs in the grid: 6 trained, 0 reused, 0 failed" in out and "dual_attention" in out
    res = tmp_path / "results"
    # .lock: the results folder lock (empty when free; see tests/test_ablate_faults.py); probe: its cached predictions;
    # ablation_config.yaml: the resolved settings (tests/test_configfile.py)
    assert sorted(p.name for p in res.iterdir() if p.name != ".lock") == [
        "ablation_config.yaml", "ablation_synth.csv", "ablation_synth.json", "ablation_synth.md", "ablation_synth.tex", "probe"]
    data = json.loads((res / "ablation_synth.json").read_text())
    heads = [r for r in data["rows"] if r["kind"] == "measured"]
    assert len(heads) == 3 and all(r["seeds_finished"] == 2 for r in heads)
    assert [r["head"] for r in data["rows"] if r["kind"] == "probe"] == ["probe (text)", "probe (image)",
                                                                          "probe (text+image)"]
    # 8 test posts: the top row is rarely distinguishable, but it is always either best or tied
    assert sum(r["best_macro_f1"] or r["tied_macro_f1"] for r in data["rows"]) >= 1
    assert len(list(csv.DictReader((res / "ablation_synth.csv").open()))) == 6
    assert "| head | features | test n | seeds |" in (res / "ablation_synth.md").read_text()

    count_trainings.clear()
    (res / "ablation_synth.md").unlink()
    rc = _cli(caches, tmp_path, "-d", "synth", "--heads", "text_only,basic,dual_attention", "--features", "cls",
              "--seeds", "2", "--aggregate-only", "--no-plots")
    assert rc == 0 and count_trainings == [] and (res / "ablation_synth.md").is_file()
    assert "0 trained" in capsys.readouterr().out

    assert _cli(caches, tmp_path, "--heads", "nope") == 2
    assert _cli(caches, tmp_path, "-d", "synth", "--shard", "2/2") == 2
    assert "error:" in capsys.readouterr().err


def test_cli_shards_then_aggregate(caches, tmp_path, capsys):
    args = ["-d", "multi", "--heads", "basic", "--features", "cls", "--seeds", "2", "--jobs", "1", "--no-plots"]
    assert _cli(caches, tmp_path, *args, "--shard", "0/2") == 0
    table = json.loads((tmp_path / "results" / "ablation_multi.json").read_text())
    assert table["counts"]["finished"] == 2 and table["counts"]["missing"] == 2
    assert _cli(caches, tmp_path, *args, "--shard", "1/2") == 0
    table = json.loads((tmp_path / "results" / "ablation_multi.json").read_text())
    heads = [r for r in table["rows"] if r["kind"] == "measured"]  # + 3 probes per encoder pair
    assert table["counts"]["finished"] == 4 and len(heads) == 2 and len(table["encoders"]) == 2
    assert "encoder" in capsys.readouterr().out  # two encoder pairs: the column is shown


def test_cli_failed_run_exits_1_after_writing_tables(caches, tmp_path, monkeypatch, capsys):
    def boom(config, data=None, **kw):
        raise RuntimeError("no luck")

    monkeypatch.setattr(ab.execute, "train", boom)
    rc = _cli(caches, tmp_path, "-d", "synth", "--heads", "basic", "--features", "cls", "--seeds", "1", "--jobs", "1",
              "--no-plots")
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 1 runs failed" in captured.err and "no luck" in captured.out
    data = json.loads((tmp_path / "results" / "ablation_synth.json").read_text())
    assert data["runs"][0]["status"] == "failed" and data["runs"][0]["error"] == "RuntimeError: no luck"


def test_plots_optional(caches, tmp_path, monkeypatch):
    runs = _grid(caches, tmp_path, seeds=1)
    ab.run_grid(runs, threads=1)
    tables = ab.aggregate(runs)
    pytest.importorskip("matplotlib")
    paths = ab.write_results(tables, tmp_path / "res")["synth"]
    assert [p.name for p in paths[4:]] == ["ablation_synth.png", "ablation_synth_confusion.png"]
    assert all(p.stat().st_size > 1000 for p in paths[4:])
    import mmcache.fuse.plots

    monkeypatch.setattr(mmcache.fuse.plots, "pyplot", lambda: None)  # as without matplotlib
    assert len(ab.write_results(tables, tmp_path / "res2")["synth"]) == 4  # md, csv, json, tex


def test_jobs_2_gives_the_same_numbers_as_jobs_1(caches, tmp_path):
    kw = dict(heads=["text_only", "dual_attention"], features=["cls", "tokens"], seeds=1)
    one = _grid(caches, tmp_path / "one", **kw)
    two = _grid(caches, tmp_path / "two", **kw)
    ab.run_grid(one, jobs=1, threads=1)
    out = ab.run_grid(two, jobs=2, threads=1)
    assert len(out["trained"]) == 4 and not out["failed"]
    for a, b in zip(one, two, strict=True):
        ma = json.loads((a.run_dir / "metrics.json").read_text())
        mb = json.loads((b.run_dir / "metrics.json").read_text())
        assert ma["test"] == mb["test"] and ma["val"] == mb["val"]
        assert (a.run_dir / "predictions.csv").read_text() == (b.run_dir / "predictions.csv").read_text()


# --------------------------------------------------------------------------------------------- issue 11

def test_results_of_different_runs_dirs_stay_apart(caches, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for runs_dir, seeds in (("runs/demo", 2), ("runs/ablate", 1)):
        ab.run_ablation(ab.AblationConfig(datasets=["synth"], heads=["text_only"], features=["cls"], seeds=seeds,
                                          base=TINY, cache_dir=str(caches), runs_dir=runs_dir, jobs=1, plots=False))
    demo = json.loads((tmp_path / "results" / "demo" / "ablation_synth.json").read_text())
    one = json.loads((tmp_path / "results" / "ablate" / "ablation_synth.json").read_text())
    assert demo["seeds"] == [0, 1] and one["seeds"] == [0]  # the one-seed ablation left the other table alone
    assert not (tmp_path / "results" / "ablation_synth.json").exists()


def test_base_config_with_unknown_head_is_refused(caches, tmp_path):
    with pytest.raises(BadInputError, match="unknown head 'transformer_xl'.*dual_attention"):
        ab.expand_grid(TrainConfig(head="transformer_xl"), datasets=["synth"], cache_dir=caches,
                       runs_dir=tmp_path / "runs")


def test_interrupted_run_folder_is_listed_unfinished(caches, tmp_path):
    runs = _grid(caches, tmp_path, heads=["text_only"], seeds=2)
    ab.run_grid(runs, jobs=1)
    victim = runs[0].run_dir
    (victim / "UNFINISHED").write_text("interrupted after 1 of 1 epochs\n")  # as train() leaves it on Ctrl-C
    assert ab.run_status(runs[0]) == "unfinished" and ab.run_status(runs[1]) == "finished"
    table = ab.aggregate(runs)["synth"]
    assert table["counts"]["unfinished"] == 1
    assert "1 unfinished" in ab.format_tables({"synth": table})
    done = ab.run_grid(runs, jobs=1)  # a rerun redoes it
    assert done["trained"] == [runs[0].name] and done["reused"] == [runs[1].name]
    assert not (victim / "UNFINISHED").exists()
