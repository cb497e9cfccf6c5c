"""Stacked training (fuse/stack.py) and the stacked ablation path (fuse/ablate/execute.py, ablate --stack / --lrs):
a member of a stack scores as the same config trained alone, stops early on its own with its best weights
kept, writes the same run folder; a stacked grid gives the same folders and tables as one model per run;
--lrs picks the best learning rate on validation; an interrupted stacked grid resumes."""

from __future__ import annotations

import csv
import dataclasses
import json

import mmcache.fuse.ablate as ab
import mmcache.fuse.ablate.execute as sched
import numpy as np
import pytest
import torch
from mmcache.fuse.data import load_data
from mmcache.fuse.engine import build_head
from mmcache.fuse.evaluate import evaluate
from mmcache.fuse.heads import BasicFusionHead, list_heads
from mmcache.fuse.runs import RUN_FILES
from mmcache.fuse.stack import _unsupported, can_stack, stack_key, train_stack
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig, train
from safetensors.torch import load_file

from mmcache import cli
from mmcache.errors import BadInputError

TINY = TrainConfig(dim=8, heads=2, epochs=1, batch_size=16, eval_batch_size=64, lr=3e-3, patience=0, device="cpu",
                   threads=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=90, dt=12, di=16, lt=6, li=5, signal=0.7)
    return root


def _probs(run_dir) -> np.ndarray:
    with open(run_dir / "predictions.csv", encoding="utf-8") as f:
        return np.array([[float(v) for k, v in row.items() if k.startswith("p_")] for row in csv.DictReader(f)])


# CUDA where present (the GPU machine runs this file too), in float32 there: bf16 is checked below
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every registered head the stack takes (asked of the registry: a new head is checked without an edit here).
STACKABLE = [h for h in list_heads() if can_stack(dataclasses.replace(TINY, head=h))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head,features", [(h, "tokens") for h in STACKABLE] + [("basic", "cls"), ("dual_attention", "cls")])
def test_member_of_a_stack_scores_as_trained_alone(cache, tmp_path, head, features, device):
    data = load_data("synth", modalities=["text", "image"], features=features, cache_dir=cache, device=device)
    base = dataclasses.replace(TINY, head=head, features=features, dropout=0.0, epochs=6, patience=2, dataset="synth",
                               modalities=["text", "image"], cache_dir=str(cache), runs_dir=str(tmp_path / "stack"),
                               device=device, amp=False)
    # CPU: bit for bit (per-member addmm, and train() trains a stackable head as a stack of one);
    # CUDA: one baddbmm for all members, whose sums may differ in the last bits from a stack of another size
    atol = 0.0 if device == "cpu" else 1e-4
    configs = [dataclasses.replace(base, seed=s, lr=lr, weight_decay=wd, run_name=f"m{s}")
               for s, lr, wd in [(0, 3e-3, 0.01), (1, 1e-3, 0.0), (2, 3e-3, 0.1)]]
    results = train_stack(configs, data)
    for c, res in zip(configs, results, strict=True):
        assert res.error is None and res.run_dir == tmp_path / "stack" / c.run_name
        alone = train(dataclasses.replace(c, runs_dir=str(tmp_path / "alone")), data)
        assert res.metrics["best_epoch"] == alone.metrics["best_epoch"]
        assert res.metrics["epochs_run"] == alone.metrics["epochs_run"]
        np.testing.assert_allclose(_probs(res.run_dir), _probs(alone.run_dir), atol=atol)
        assert res.metrics["test"]["macro_f1"] == pytest.approx(alone.metrics["test"]["macro_f1"])
        # the same files, and config.json as train() writes it (only where it went differs)
        assert all((res.run_dir / f).is_file() for f in RUN_FILES)
        mine, theirs = (json.loads((d / "config.json").read_text()) for d in (res.run_dir, alone.run_dir))
        assert {**mine, "runs_dir": None} == {**theirs, "runs_dir": None}
        for a, b in zip(res.history, alone.history, strict=True):
            assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"]) and a["lr"] == pytest.approx(b["lr"])
        # weights that train() never updates (no output reaches them: dual attention's queries over one
        # key) are saved at their initial values by the stack too. (Other weights are not compared one by
        # one: where the true gradient is 0, as for attention's key bias, Adam amplifies float noise.)
        mine, theirs = (load_file(d / "model.safetensors") for d in (res.run_dir, alone.run_dir))
        if device == "cpu":
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        torch.manual_seed(c.seed)
        init = build_head(c, data.dims(), data.num_classes).state_dict()
        untouched = [k for k in theirs if torch.equal(theirs[k].cpu(), init[k])]
        assert bool(untouched) == ((head, features) == ("dual_attention", "cls"))
        assert all(torch.equal(mine[k].cpu(), init[k]) for k in untouched), untouched


def test_members_stop_early_on_their_own_and_keep_their_best_weights(cache, tmp_path):
    data = load_data("synth", modalities=["text", "image"], features="cls", cache_dir=cache)
    base = dataclasses.replace(TINY, head="basic", dropout=0.0, epochs=12, patience=2, dataset="synth",
                               cache_dir=str(cache), runs_dir=str(tmp_path), modalities=["text", "image"])
    # lr 1e-7 cannot move the weights: its val F1 never improves and it stops after `patience` epochs
    configs = [dataclasses.replace(base, seed=0, lr=1e-7, run_name="frozen"),
               dataclasses.replace(base, seed=0, lr=3e-3, run_name="learning")]
    frozen, learning = train_stack(configs, data)
    assert frozen.metrics["epochs_run"] == 3 and frozen.metrics["stopped_early"]
    assert learning.metrics["epochs_run"] > frozen.metrics["epochs_run"]
    for res in (frozen, learning):
        best = res.history[res.metrics["best_epoch"] - 1]["val_macro_f1"]
        assert res.metrics["val"]["macro_f1"] == pytest.approx(best)  # scored with the best epoch's weights
        again = evaluate(res.run_dir, split="val", write=False)  # the saved weights are those weights
        assert again.metrics["macro_f1"] == pytest.approx(best)
        assert len(json.loads((res.run_dir / "history.json").read_text())) == res.metrics["epochs_run"]


def test_what_may_share_a_stack(cache):
    a = dataclasses.replace(TINY, head="basic")
    assert stack_key(a) == stack_key(dataclasses.replace(a, seed=3, lr=1e-4, weight_decay=0.0, run_name="x"))
    assert stack_key(a) != stack_key(dataclasses.replace(a, dim=16))
    assert stack_key(a) != stack_key(dataclasses.replace(a, dropout=0.3))
    with pytest.raises(BadInputError):
        train_stack([a, dataclasses.replace(a, dim=16)])
    assert set(STACKABLE) >= {"text_only", "image_only", "basic", "self_attention", "dual_attention"}

    class WithOwnParameter(BasicFusionHead):  # a parameter outside Linear/LayerNorm, no adapter: not stackable
        def __init__(self, **kw):
            super().__init__(**kw)
            self.scale = torch.nn.Parameter(torch.ones(1))

    head = WithOwnParameter(text_dim=4, image_dim=4, num_classes=3, dim=8, layers=1, heads=2, dropout=0.0)
    assert _unsupported(head) == ["scale"]


def _table_numbers(tables):
    return [(r["head"], r["seeds_finished"], r["macro_f1"]["mean"], r["accuracy"]["mean"])
            for r in tables["synth"]["rows"]]


def test_stacked_grid_gives_the_same_folders_and_tables(cache, tmp_path):
    kw = dict(datasets=["synth"], heads=["text_only", "dual_attention"], features=["cls"], seeds=3, cache_dir=cache)
    base = dataclasses.replace(TINY, dropout=0.0, epochs=3)
    single = ab.expand_grid(base, runs_dir=tmp_path / "single", **kw)
    stacked = ab.expand_grid(base, runs_dir=tmp_path / "stacked", **kw)
    assert len(sched.plan_units(stacked, True)) == 2 and len(sched.plan_units(stacked, False)) == 6
    ab.run_grid(single, threads=1, stack=False)
    out = ab.run_grid(stacked, threads=1, stack=True)
    assert len(out["trained"]) == 6 and not out["failed"]
    for a, b in zip(single, stacked, strict=True):
        assert a.name == b.name and ab.run_status(b) == "finished"
        assert sorted(p.name for p in a.run_dir.iterdir()) == sorted(p.name for p in b.run_dir.iterdir())
    t1, t2 = ab.aggregate(single), ab.aggregate(stacked)
    for x, y in zip(_table_numbers(t1), _table_numbers(t2), strict=True):
        assert x[:2] == y[:2] and x[2] == pytest.approx(y[2], abs=1e-6) and x[3] == pytest.approx(y[3], abs=1e-6)
    ab.write_results(t2, tmp_path / "res", plots=False)
    assert "| head | features | test n | seeds |" in (tmp_path / "res" / "ablation_synth.md").read_text()
    assert ab.run_grid(stacked, threads=1, stack=True)["reused"] == [r.name for r in stacked]


def test_lrs_best_on_validation_is_reported(cache, tmp_path, capsys):
    rc = cli.main(["ablate", "--cache-dir", str(cache), "--runs-dir", str(tmp_path / "runs"), "--results-dir",
                   str(tmp_path / "res"), "-d", "synth", "--heads", "basic", "--features", "cls", "--seeds", "2",
                   "--dim", "8", "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--threads", "1",
                   "--jobs", "1", "--no-plots", "--lrs", "1e-7,3e-3", "--dropouts", "0,0.2"])
    assert rc == 0
    table = json.loads((tmp_path / "res" / "ablation_synth.json").read_text())
    heads = [r for r in table["rows"] if r["kind"] == "measured"]  # the others: linear probes
    assert len(table["runs"]) == 8 and len(heads) == 2  # a row per dropout, the lrs are a choice
    for row in heads:
        recs = [x for x in table["runs"] if x["variant"] == row["variant"]]
        val = {lr: np.mean([x["val_macro_f1"] for x in recs if x["lr"] == lr]) for lr in (1e-7, 3e-3)}
        assert row["lr"] == max(val, key=val.get) == 3e-3
        assert row["lr_choice"] == {f"{lr:g}": pytest.approx(v) for lr, v in val.items()}
        test = [x["macro_f1"] for x in recs if x["lr"] == row["lr"]]  # test of the chosen lr only
        assert row["seeds_total"] == 2 and row["macro_f1"]["mean"] == pytest.approx(np.mean(test))
    md = (tmp_path / "res" / "ablation_synth.md").read_text()
    assert "lr (best on val)" in md and "variant" in md and "dropout 0.2" in md
    assert "lr (best on val)" in capsys.readouterr().out
    assert cli.main(["ablate", "--cache-dir", str(cache), "--lrs", "fast"]) == 2


def test_interrupted_stacked_grid_resumes(cache, tmp_path, monkeypatch):
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only", "basic", "image_only"], features=["cls"],
                          seeds=2, cache_dir=cache, runs_dir=tmp_path / "runs")
    real, calls = sched.train_stack, []

    def interrupted(configs, data=None, **kw):
        calls.append([c.run_name for c in configs])
        if len(calls) == 2:  # Ctrl-C during the second stack: its folders exist, unfinished
            for c in configs:
                (tmp_path / "runs" / "synth" / c.run_name).mkdir(parents=True)
            raise KeyboardInterrupt
        return real(configs, data, **kw)

    monkeypatch.setattr(sched, "train_stack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ab.run_grid(runs, threads=1, stack=True)
    assert [ab.run_status(r) for r in runs].count("finished") == 2
    calls.clear()
    monkeypatch.setattr(sched, "train_stack", lambda c, d=None, **kw: (calls.append([x.run_name for x in c]),
                                                                      real(c, d, **kw))[1])
    out = ab.run_grid(runs, threads=1, stack=True)
    assert len(out["reused"]) == 2 and len(calls) == 2 and all(len(c) == 2 for c in calls)
    assert all(ab.run_status(r) == "finished" for r in runs)
    # one member lost its metrics.json: only it is retrained (alone, by train())
    (runs[0].run_dir / "metrics.json").unlink()
    calls.clear()
    out = ab.run_grid(runs, threads=1, stack=True)
    assert calls == [] and out["trained"] == [runs[0].name] and ab.run_status(runs[0]) == "finished"


def test_cpu_layout_is_measured(cache, tmp_path):
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only", "basic"], features=["cls"], seeds=2,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    units = sched.plan_units(runs, True)
    jobs, info = sched.choose_cpu_layout(units, 2, threads=1)
    assert jobs == 2 and len(info["unit_step_seconds"]) == 2 and info["choice"]
    assert sched.choose_cpu_layout(units, 2, threads=2)[0] == 1  # the thread count is given, never chosen
    assert sched._makespan([3.0, 2.0, 2.0, 1.0], 2) == 4.0
    # a stack that would keep one core busy alone is cut into parts (members are independent)
    assert [(u[0].head, len(u)) for u in sched.plan_units(runs, True, {"basic": 2})] == [
        ("basic", 1), ("basic", 1), ("text_only", 2)]


def test_token_features_train_one_model_per_run_on_cpu(cache, tmp_path):
    # measured slower stacked on a CPU (bench grid section); vectors still stack
    runs = ab.expand_grid(dataclasses.replace(TINY, device="cpu"), datasets=["synth"], heads=["basic"],
                          features=["cls", "tokens"], seeds=3, cache_dir=cache, runs_dir=tmp_path / "runs")
    units = sched.plan_units(runs, True)
    assert sorted((u[0].features, len(u)) for u in units) == [("cls", 3), ("tokens", 1), ("tokens", 1), ("tokens", 1)]


@pytest.mark.parametrize("head", STACKABLE)
def test_stacked_step_under_bf16_autocast_matches_single_models(cache, head):
    # CUDA trains under bf16 autocast (engine.autocast); CPU autocast runs the same casting rules, so the
    # stacked Linear's mixed-precision forward and backward are checked here without a GPU.
    from mmcache.fuse import stack as st

    data = load_data("synth", modalities=["text", "image"], features="tokens", cache_dir=cache)
    configs = [dataclasses.replace(TINY, head=head, features="tokens", dropout=0.0, seed=s) for s in (0, 1)]
    stack = st._build_stack(configs, data, data.device)
    rows = torch.stack([data.split_rows["train"][s * 8:s * 8 + 8] for s in (0, 1)])  # (M, b): own rows each
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = stack.module(*data.batch(rows.reshape(-1)))
    assert logits.dtype == torch.bfloat16
    loss = torch.nn.functional.cross_entropy(logits.float().view(2, 8, -1).transpose(1, 2), data.labels[rows],
                                             reduction="none").mean(1)
    grad = stack.gradient(loss.sum())
    assert grad.dtype == torch.float32
    for m, c in enumerate(configs):
        torch.manual_seed(c.seed)
        model = build_head(c, data.dims(), data.num_classes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            single = torch.nn.functional.cross_entropy(model(*data.batch(rows[m])).float(), data.labels[rows[m]])
        single.backward()
        assert loss[m].item() == pytest.approx(single.item(), rel=2e-2)
        expect = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                            for p in model.parameters()])
        assert torch.linalg.vector_norm(grad[m] - expect) <= 3e-2 * torch.linalg.vector_norm(expect)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", STACKABLE)
def test_bf16_member_on_cuda_scores_close_to_trained_alone(cache, tmp_path, head):
    data = load_data("synth", modalities=["text", "image"], features="tokens", cache_dir=cache, device="cuda")
    base = dataclasses.replace(TINY, head=head, features="tokens", dropout=0.0, epochs=2, patience=0, dataset="synth",
                               modalities=["text", "image"], cache_dir=str(cache), device="cuda", amp=True)
    configs = [dataclasses.replace(base, seed=s, run_name=f"m{s}", runs_dir=str(tmp_path / "stack")) for s in (0, 1)]
    for c, res in zip(configs, train_stack(configs, data), strict=True):
        alone = train(dataclasses.replace(c, runs_dir=str(tmp_path / "alone")), data)
        np.testing.assert_allclose(_probs(res.run_dir), _probs(alone.run_dir), atol=3e-2)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_member_losses_equal_the_trainers_loss(weighted, smoothing, masked):
    # the stacked loss is reduced per member without a host sync; it must equal target_loss member by member
    from mmcache.fuse.stack import _member_losses
    from mmcache.fuse.targets import target_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 4, generator=g)
    labels = torch.randint(0, 4, (3, 8, 1), generator=g)
    if masked:
        labels[1, :5] = -1
    weights = [torch.tensor([0.5, 1.0, 2.0, 1.5])] if weighted else None
    got = _member_losses(logits, labels, [4], weights, smoothing)
    want = torch.stack([target_loss(lg, y, [4], weights, smoothing) for lg, y in zip(logits, labels, strict=True)])
    torch.testing.assert_close(got, want)


def test_task_member_with_masked_labels_scores_as_trained_alone(tmp_path):
    # a task (several targets, some labels missing): stacked per-member losses go through target_loss
    n = 90
    labels = (np.arange(n) * 7) % 3  # make_cache's labels (seed 0)
    binary = (labels == 0).astype(int)
    binary[np.arange(n) % 10 == 3] = -1  # missing
    make_cache(tmp_path / "c", "synth", n=n, dt=12, di=16, lt=6, li=5, signal=0.7,
               targets={"binary": (["other", "first"], binary.tolist())}, tasks={"both": ["sentiment", "binary"]})
    data = load_data("synth", modalities=["text", "image"], features="cls", cache_dir=tmp_path / "c", target="both")
    assert data.target.multi
    base = dataclasses.replace(TINY, head="basic", dropout=0.0, epochs=4, patience=2, dataset="synth", target="both",
                               modalities=["text", "image"], cache_dir=str(tmp_path / "c"), class_balanced=True)
    configs = [dataclasses.replace(base, seed=s, run_name=f"m{s}", runs_dir=str(tmp_path / "stack")) for s in (0, 1)]
    for c, res in zip(configs, train_stack(configs, data), strict=True):
        assert res.error is None
        alone = train(dataclasses.replace(c, runs_dir=str(tmp_path / "alone")), data)
        assert res.metrics["best_epoch"] == alone.metrics["best_epoch"]
        assert res.metrics["test"]["macro_f1"] == pytest.approx(alone.metrics["test"]["macro_f1"])
        assert set(res.metrics["test"]["targets"]) == {"sentiment", "binary"}
        mine, theirs = (list(csv.DictReader((d / "predictions.csv").read_text(encoding="utf-8").splitlines()))
                        for d in (res.run_dir, alone.run_dir))
        assert len(mine) == len(theirs) and mine[0].keys() == theirs[0].keys()
        probs = [k for k in mine[0] if ":p_" in k]  # <target>:p_<class>; the rest are ids and labels
        assert len(probs) == 5
        for a, b in zip(mine, theirs, strict=True):
            assert {k: v for k, v in a.items() if k not in probs} == {k: v for k, v in b.items() if k not in probs}
            np.testing.assert_allclose([float(a[k]) for k in probs], [float(b[k]) for k in probs], atol=2e-5)


def test_a_task_grid_trains_stacked(tmp_path):
    n = 60
    make_cache(tmp_path / "c", "synth", n=n, dt=12, di=16, lt=6, li=5, signal=0.7,
               targets={"binary": (["other", "first"], [i % 2 for i in range(n)])},
               tasks={"both": ["sentiment", "binary"]})
    runs = ab.expand_grid(dataclasses.replace(TINY, device="cpu"), datasets=["synth"], heads=["basic"],
                          features=["cls"], seeds=2, cache_dir=tmp_path / "c", runs_dir=tmp_path / "runs",
                          targets=["both"])
    assert [len(u) for u in sched.plan_units(runs, True)] == [2]
    done = ab.run_grid(runs, jobs=1, threads=1, stack=True)
    assert sorted(done["trained"]) == sorted(r.name for r in runs) and not done["failed"]
    for r in runs:
        metrics = json.loads((r.run_dir / "metrics.json").read_text())
        assert metrics["stack"]["members"] == 2 and set(metrics["test"]["targets"]) == {"sentiment", "binary"}


def test_adamw_without_the_fused_kernel_gives_the_same_step(monkeypatch):
    # a device without torch's fused AdamW kernel takes the plain-ops formula: it must be the same AdamW
    from mmcache.fuse import stack as st

    g = torch.Generator().manual_seed(0)
    flat, grads = torch.randn(3, 50, generator=g), [torch.randn(3, 50, generator=g) for _ in range(3)]
    lr, wd = [1e-3, 3e-4, 1e-3], [0.01, 0.0, 0.01]

    def run():
        p, state = flat.clone(), {"m": torch.zeros_like(flat), "v": torch.zeros_like(flat)}
        for step, grad in enumerate(grads, 1):
            st._adamw_step(p, grad, state, lr, wd, step)
        return p

    fused = run()

    def missing(*a, **kw):
        raise NotImplementedError("no fused AdamW here")

    monkeypatch.setattr(torch, "_fused_adamw_", missing)
    torch.testing.assert_close(run(), fused)
    assert not torch.equal(fused, flat)
