"""bench/grid.py's arithmetic floor: the FLOPs it counts for a grid's runs are the heads' real matmul work."""

from __future__ import annotations

import dataclasses

import pytest
from mmcache.bench.grid import arithmetic_floor, format_grid
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig, train


def test_floor_counts_every_runs_matmul_work(tmp_path):
    dt, di, dim, classes, n = 12, 16, 8, 3, 100
    make_cache(tmp_path / "cache", "grid", n=n, dt=dt, di=di, lt=1, li=1)
    base = TrainConfig(head="text_only", dataset="grid", dim=dim, epochs=3, patience=0, device="cpu", threads=1,
                       cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"),
                       modalities=["text", "image"])
    train(dataclasses.replace(base, run_name="a"))
    one = arithmetic_floor(tmp_path / "runs", tmp_path / "cache", "cpu", gflops_matmul=1.0)
    # text_only: Linear(dt, dim) -> LayerNorm -> Linear(dim, dim) -> GELU -> Linear(dim, C); a step is the
    # forward, and in the backward every weight gradient plus every input gradient but the first layer's
    b = 32
    fwd = 2 * b * (dt * dim + dim * dim + dim * classes)
    assert one["step_gflop"]["text_only"] * 1e9 == pytest.approx(3 * fwd - 2 * b * dt * dim)
    splits = {"train": 60, "val": 20, "test": 20}  # make_cache: 60/20/20 by position
    want = 3 * (60 / b) * (3 * fwd - 2 * b * dt * dim) + (3 * splits["val"] + n) * fwd / b
    assert one["tflop"] * 1e12 == pytest.approx(want)
    assert one["floor_seconds"] == pytest.approx(want / 1e9)
    train(dataclasses.replace(base, run_name="b", epochs=6))  # twice the epochs: the floor grows by that run
    two = arithmetic_floor(tmp_path / "runs", tmp_path / "cache", "cpu", gflops_matmul=1.0)
    assert two["tflop"] * 1e12 == pytest.approx(want + 6 * (60 / b) * (3 * fwd - 2 * b * dt * dim)
                                               + (6 * splits["val"] + n) * fwd / b)
    g = {"load_before": None, "load_after": None, "cls": [], "tokens": [], "steps": [], "cls_speedup": 1.0,
         "lrs_cost": 1.0, "tokens_speedup": 1.0, "samples": n, "cls_floor": two}
    assert any("cls grid arithmetic" in line for line in format_grid(g))
