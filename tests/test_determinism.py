"""A run's numbers are a function of its key (config, data, seed) alone, bit for bit on CPU float32: the same
whether it was trained alone (``train``), in a stack of any size or composition, split into chunks, by a
``--no-stack`` grid, or retrained after a kill + resume. Dropout 0.1 everywhere: its masks come from each
run's own generator (heads.RunDropout), so they cannot depend on what else shared the stack.

Why the stacked Linear runs one ``addmm`` per member on CPU (fuse/stack.py ``_per_member_linear``) and not one
``baddbmm`` for all: with 2 threads MKL's batched gemm gave a member different last bits depending on the
stack size M (checked for (N, in, out) = (7, 768, 256)), and ``addmm`` is the kernel a plain Linear runs.
Measured cost on the shared 2-core dev CPU (load average 6-8, so +-20% noise), one stacked step of 5 members,
dim 256, 768-d features, batch 32, 1 thread, per-member addmm vs one baddbmm: basic/cls 53 vs 44 ms and
64 vs 49 ms; self_attention/cls 194 vs 176 ms and 147 vs 103 ms (about 1.1-1.4x). ``train()`` through a
stack of one vs the plain loop (3 epochs, 600 samples): basic/cls 1.00 vs 1.16 s, 1.05 vs 0.92 s;
self_attention/cls 1.83 vs 2.05 s, 2.08 vs 1.82 s (no measurable difference).
"""

from __future__ import annotations

import dataclasses
import json

import mmcache.fuse.ablate as ab
import mmcache.fuse.ablate.execute as sched
import pytest
import torch
from mmcache.fuse.data import load_data
from mmcache.fuse.engine import build_head
from mmcache.fuse.heads import RunDropout, dropout_generator, list_heads, set_dropout_generators
from mmcache.fuse.stack import can_stack, train_stack
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig, train
from safetensors.torch import load_file

from mmcache import cli
from mmcache.common import small_model_threads

TINY = TrainConfig(dim=8, heads=2, epochs=3, batch_size=16, eval_batch_size=64, lr=3e-3, patience=0, device="cpu",
                   threads=1, dropout=0.1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=90, dt=12, di=16, lt=6, li=5, signal=0.7)
    return root


def _same_run(a, b) -> None:
    """Bit-identical weights, predictions and histories of two run folders."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for split in ("train", "val", "test"):
        assert ma[split] == mb[split]
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ha] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in hb]


def _base(cache, tmp_path, head, features="tokens", **kw):
    return dataclasses.replace(TINY, head=head, features=features, dataset="synth", modalities=["text", "image"],
                               cache_dir=str(cache), runs_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("head", list_heads())
def test_stacked_member_with_dropout_equals_train_alone_bitwise(cache, tmp_path, head):
    base = _base(cache, tmp_path / "stack", head, patience=2, epochs=4)
    if not can_stack(base):
        pytest.skip(f"{head} cannot be stacked: always trained alone")
    data = load_data("synth", modalities=["text", "image"], features="tokens", cache_dir=cache)
    configs = [dataclasses.replace(base, seed=s, lr=lr, weight_decay=wd, run_name=f"m{s}")
               for s, lr, wd in [(0, 3e-3, 0.01), (1, 1e-3, 0.0), (2, 3e-3, 0.1)]]
    for c, res in zip(configs, train_stack(configs, data), strict=True):
        assert res.error is None
        alone = train(dataclasses.replace(c, runs_dir=str(tmp_path / "alone")), data)
        _same_run(res.run_dir, alone.run_dir)
    # dropout really acts: another seed's masks give other weights
    one, two = (load_file(tmp_path / "stack" / n / "model.safetensors") for n in ("m0", "m2"))
    assert any(not torch.equal(one[k], two[k]) for k in one)


def test_reproducing_a_run_from_its_config_json_is_bitwise(cache, tmp_path):
    # `train-fusion --config <run>/config.json` of a member of a stack of 3 (the README's promise)
    base = _base(cache, tmp_path / "stack", "self_attention")
    data = load_data("synth", modalities=["text", "image"], features="tokens", cache_dir=cache)
    configs = [dataclasses.replace(base, seed=s, run_name=f"m{s}") for s in (5, 6, 7)]
    res = train_stack(configs, data)[1]
    rc = cli.main(["train-fusion", "--config", str(res.run_dir / "config.json"), "--runs-dir", str(tmp_path / "again"),
                   "--run-name", "again"])
    assert rc == 0
    _same_run(res.run_dir, tmp_path / "again" / "again")


@pytest.mark.parametrize("head,features", [("basic", "cls"), ("self_attention", "tokens"), ("dual_attention", "tokens")])
def test_a_member_is_the_same_in_any_stack(cache, tmp_path, head, features):
    # early stopping (patience 1) makes members leave mid-training: the others must not notice
    base = _base(cache, tmp_path, head, features=features, epochs=5, patience=1)
    data = load_data("synth", modalities=["text", "image"], features=features, cache_dir=cache)
    others = [dataclasses.replace(base, seed=s, lr=lr) for s, lr in [(11, 1e-7), (12, 1e-3), (13, 3e-3), (14, 1e-2)]]
    target = dataclasses.replace(base, seed=3)

    def member(tag: str, configs: list[TrainConfig], at: int):
        configs = [dataclasses.replace(c, run_name=f"{tag}{k}", runs_dir=str(tmp_path / tag))
                   for k, c in enumerate(configs)]
        res = train_stack(configs, data)
        assert all(r.error is None for r in res)
        return res[at].run_dir

    alone = train(dataclasses.replace(target, run_name="alone", runs_dir=str(tmp_path / "alone")), data).run_dir
    _same_run(alone, member("one", [target], 0))
    _same_run(alone, member("three", [others[0], target, others[1]], 1))
    _same_run(alone, member("five", [*others[2:], target, *others[:2]], 2))
    _same_run(alone, member("last", [*others, target], 4))  # the others stop early around it


def _table_values(res_dir):
    """Every number of the ablation JSON table that comes from the runs (not timings or paths)."""
    table = json.loads((res_dir / "ablation_synth.json").read_text())
    rows = [{k: v for k, v in r.items() if "second" not in k and k not in ("runs", "run_dirs")} for r in table["rows"]]
    runs = sorted(({k: v for k, v in r.items() if "second" not in k and "dir" not in k} for r in table["runs"]),
                  key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return rows, runs


def _grid(cache, runs_dir, seeds=3):
    return ab.expand_grid(TINY, datasets=["synth"], heads=["text_only", "basic", "self_attention"],
                          features=["cls"], seeds=seeds, cache_dir=cache, runs_dir=runs_dir)


def _write_table(runs, res_dir):
    ab.write_results(ab.aggregate(runs), res_dir, plots=False)
    return _table_values(res_dir)


def test_killed_and_resumed_grid_writes_the_same_table(cache, tmp_path, monkeypatch):
    whole = _grid(cache, tmp_path / "whole")
    ab.run_grid(whole, threads=1, stack=True)
    expected = _write_table(whole, tmp_path / "res_whole")
    assert expected[1] and all(r["macro_f1"] is not None for r in expected[1])

    runs = _grid(cache, tmp_path / "cut")
    real, calls = sched.train_stack, []

    def killed(configs, data=None, **kw):
        calls.append(len(configs))
        if len(calls) == 2:  # Ctrl-C during the second stack
            raise KeyboardInterrupt
        return real(configs, data, **kw)

    monkeypatch.setattr(sched, "train_stack", killed)
    with pytest.raises(KeyboardInterrupt):
        ab.run_grid(runs, threads=1, stack=True)
    monkeypatch.setattr(sched, "train_stack", real)
    # one finished member of the first stack loses its metrics: retrained alone (train()), the rest as stacks
    finished = [r for r in runs if ab.run_status(r) == "finished"]
    assert 0 < len(finished) < len(runs)
    (finished[0].run_dir / "metrics.json").unlink()
    out = ab.run_grid(runs, threads=1, stack=True)
    assert not out["failed"] and finished[0].name in out["trained"]
    assert _write_table(runs, tmp_path / "res_cut") == expected


def test_no_stack_stacked_and_chunked_grids_write_the_same_table(cache, tmp_path, monkeypatch):
    stacked, single = _grid(cache, tmp_path / "stacked", seeds=3), _grid(cache, tmp_path / "single", seeds=3)
    chunked = _grid(cache, tmp_path / "chunked", seeds=3)
    ab.run_grid(stacked, threads=1, stack=True)
    ab.run_grid(single, threads=1, stack=False)
    sizes = []
    real = sched.train_stack
    monkeypatch.setattr(sched, "max_members", lambda config, data: 2)  # "memory" for 2 members: stacks of 2 + 1
    monkeypatch.setattr(sched, "train_stack", lambda c, d=None, **kw: (sizes.append(len(c)), real(c, d, **kw))[1])
    ab.run_grid(chunked, threads=1, stack=True)
    assert sorted(sizes) == [1, 1, 1, 2, 2, 2]
    table = _write_table(stacked, tmp_path / "r1")
    assert table == _write_table(single, tmp_path / "r2") == _write_table(chunked, tmp_path / "r3")
    for a, b, c in zip(stacked, single, chunked, strict=True):
        _same_run(a.run_dir, b.run_dir)
        _same_run(a.run_dir, c.run_dir)


def test_run_dropout_draws_each_members_slice_from_its_own_generator():
    drop = RunDropout(0.5).train()
    x = torch.ones(3 * 4, 2, 5)  # 3 members x 4 rows, member-major
    drop.generators = [dropout_generator(s) for s in (1, 2, 3)]
    stacked = drop(x)
    for k, s in enumerate((1, 2, 3)):
        drop.generators = [dropout_generator(s)]
        assert torch.equal(drop(x[:4]), stacked[4 * k:4 * k + 4])
    assert set(stacked.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)  # identity in eval mode


def test_single_model_dropout_ignores_the_global_rng(cache):
    # a head outside the stacked path (not stackable) gets its masks from the run's generator too
    data = load_data("synth", modalities=["text", "image"], features="tokens", cache_dir=cache)
    c = dataclasses.replace(TINY, head="self_attention", features="tokens")
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(123)
        model = build_head(c, data.dims(), data.num_classes).train()
        set_dropout_generators(model, [dropout_generator(7)])
        torch.manual_seed(global_seed)  # whatever else drew from the global RNG
        outs.append(model(*data.batch(data.split_rows["train"][:8])))
    assert torch.equal(outs[0], outs[1])
    assert list(model.state_dict()) == list(build_head(c, data.dims(), data.num_classes).state_dict())


def test_per_member_linear_is_a_plain_linear():
    # the stacked Linear's forward and backward, member by member, are bit for bit a plain Linear's
    # (n = 42 rows: member slices start off a 64-byte boundary, where MKL would otherwise sum differently)
    from mmcache.fuse.stacked_layers import BatchedLinear as _BatchedLinear

    g = torch.Generator().manual_seed(0)
    m, n, i, o = 3, 7 * 6, 24, 40
    x = torch.randn(m, n, i, generator=g, requires_grad=True)
    w, b = torch.randn(m, o, i, generator=g), torch.randn(m, o, generator=g)
    gw, gb = torch.zeros(m, o, i), torch.zeros(m, o)
    y = _BatchedLinear.apply(x, w, b, gw, gb)
    up = torch.randn(m, n, o, generator=g)
    (y * up).sum().backward()
    for k in range(m):
        lin = torch.nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.copy_(w[k])
            lin.bias.copy_(b[k])
        xk = x[k].detach().clone().requires_grad_(True)
        yk = lin(xk)
        (yk * up[k]).sum().backward()
        assert torch.equal(yk, y[k])
        assert torch.equal(lin.weight.grad, gw[k]) and torch.equal(lin.bias.grad, gb[k])
        assert torch.equal(xk.grad, x.grad[k])


def test_train_own_loop_for_heads_that_cannot_stack_is_repeatable(cache, tmp_path, monkeypatch):
    # train()'s own loop (heads without a stacked form) still trains, with its dropout generator attached,
    # and repeats bit for bit after something else drew from the global RNG
    import mmcache.fuse.train as tr

    calls = []
    monkeypatch.setattr(tr, "can_stack", lambda config: calls.append(config.head) or False)  # where train() asks
    data = load_data("synth", modalities=["text", "image"], features="tokens", cache_dir=cache)
    c = _base(cache, tmp_path, "self_attention", run_name="a")
    first = train(c, data).run_dir
    torch.manual_seed(99)  # what an earlier run in the same process left in the global RNG
    torch.rand(7)
    second = train(dataclasses.replace(c, run_name="b"), data).run_dir
    assert calls == ["self_attention", "self_attention"]  # both runs took train()'s own loop
    _same_run(first, second)


def test_layout_never_sets_a_runs_thread_count(cache, tmp_path):
    # A run's thread count can change the last bits of small matmuls, so the grid's layout (processes,
    # and what was left to train after a resume) must never pick it: without --threads every run of an
    # ablation computes with small_model_threads(), in one process or in two.
    base = dataclasses.replace(TINY, threads=None)
    grids = [ab.expand_grid(base, datasets=["synth"], heads=["basic"], features=["cls"], seeds=2, cache_dir=cache,
                            runs_dir=tmp_path / name) for name in ("one", "two")]
    ab.run_grid(grids[0], jobs=1, stack=True)
    ab.run_grid(grids[1], jobs=2, stack=False)
    for a, b in zip(*grids, strict=True):
        assert json.loads((a.run_dir / "config.json").read_text())["threads"] == small_model_threads()
        _same_run(a.run_dir, b.run_dir)
