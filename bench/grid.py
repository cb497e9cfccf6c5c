"""Bench section 5: the ablation grid, stacked (fuse/stack.py) vs one model per run, side by side.

Every grid runs in a fresh child process (``python -m mmcache.bench.child ablate``), so its wall time
and peak RSS are its own and the two paths start equally cold:

* the default cls grid (every head x 5 seeds, train-fusion's defaults) on a synthetic 4,500-post cache
  with 768-d text and image features: ``--no-stack`` (processes as ``ablate`` picks them) vs ``--stack``
  (layout measured), and ``--stack --lrs 1e-4,3e-4,1e-3`` (three times the runs);
* per head, one training step of a 5-member stack vs 5 single-model steps, both as GFLOP/s (FLOPs
  counted by ``torch.utils.flop_counter``) against a plain matmul of the stack's main layer's size
  (on cls features; with ``grid_tokens_large`` on the 4,500-post tokens cache too);
* the stacked cls grid's arithmetic floor (:func:`arithmetic_floor`): its runs' FLOPs, as trained, at
  the plain matmul's rate;
* the tokens grid on a demo-sized cache (600 posts, 32-d features, 32 text / 64 image tokens, the demo's
  training settings) both ways, and optionally (``grid_tokens_large``) on the 4,500-post cache with
  128 text / 64 image tokens (long: 25 min one model per run on a 2-core CPU, under 3 min on an H200).
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LRS = [1e-4, 3e-4, 1e-3]
DEMO_TRAINING = dict(dim=64, lr=1e-3, epochs=40, patience=10, batch_size=32)  # as mmcache/demo.py


def _child(args: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mmcache.bench.child", "ablate", json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child ablate failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _grid(label: str, cache: Path, runs: Path, device: str, features: str, seeds: int, base: dict[str, Any],
          **kw) -> dict[str, Any]:
    args = {"cache_dir": str(cache), "runs_dir": str(runs), "device": device, "features": features, "seeds": seeds,
            "base": base, **kw}
    r = _child(args)
    log.info("grid %s (%s): %.1fs, peak RSS %.0f MiB", label, features, r["seconds"], r["peak_rss_mib"])
    return {"label": label, "features": features, **r}


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def step_gflops(cache: Path, device: str, heads: list[str], members: int = 5, steps: int = 5,
                features: str = "cls") -> list[dict[str, Any]]:
    """Per head: seconds and GFLOP/s of one stacked step of ``members`` vs ``members`` single steps, and a
    plain (members*batch x 768) @ (768 x dim) matmul's GFLOP/s, all at this process's thread count."""
    import torch
    from mmcache.fuse import stack as st
    from mmcache.fuse.data import load_data
    from mmcache.fuse.train import TrainConfig

    data = load_data("grid", modalities=("text", "image"), features=features, cache_dir=cache, device=device)
    threads = torch.get_num_threads()
    rows_out = []
    for head in heads:
        cfgs = [TrainConfig(head=head, features=features, seed=s, device=device, threads=threads)
                for s in range(members)]
        single_flops, single_s = _single_steps(cfgs[0], data, members, steps)
        stacked_s = st.probe_step_seconds(cfgs, data, threads=threads, steps=steps)
        stacked_flops = members * single_flops  # the same arithmetic, batched
        # the plain matmul in the dtype the step computes in (bf16 under CUDA autocast, else float32)
        dtype = torch.bfloat16 if data.device.type == "cuda" and cfgs[0].amp else torch.float32
        a = torch.randn(members * cfgs[0].batch_size, 768, device=data.device, dtype=dtype)
        b = torch.randn(768, cfgs[0].dim, device=data.device, dtype=dtype)
        mm_s = _median_seconds(functools.partial(torch.mm, a, b), 20)
        rows_out.append({"head": head, "features": features, "members": members, "stacked_step_s": stacked_s,
                         "single_steps_s": single_s,
                         "speedup": single_s / stacked_s, "gflops_stacked": stacked_flops / stacked_s / 1e9,
                         "gflops_single": stacked_flops / single_s / 1e9,
                         "gflops_matmul": 2 * a.shape[0] * 768 * b.shape[1] / mm_s / 1e9, "threads": threads})
        log.info("step %s: stacked %.1f ms vs %d single %.1f ms", head, stacked_s * 1e3, members, single_s * 1e3)
    return rows_out


def arithmetic_floor(runs_dir: Path, cache: Path, device: str, gflops_matmul: float) -> dict[str, Any]:
    """The seconds a finished cls grid's matrix arithmetic alone takes at ``gflops_matmul`` (the plain
    matmul's rate on this machine). Per run: epochs_run x (train samples / batch size) training steps of
    forward + backward, a forward of the validation split per epoch, and one of every split at the end
    (as train() scores them), with FLOPs counted by ``torch.utils.flop_counter`` on the run's own config.
    Optimizer, dropout and data movement are not counted: these runs cannot finish sooner on this
    machine unless their (small) matmuls ran faster than a plain large one does."""

    from mmcache.fuse.data import load_data
    from mmcache.fuse.stack import stack_key

    data = load_data("grid", modalities=("text", "image"), features="cls", cache_dir=cache, device=device)
    n = {k: v.numel() for k, v in data.split_rows.items()}
    per_config: dict[str, tuple[float, float]] = {}  # FLOPs of a step and of one sample's forward
    step_gflop: dict[str, float] = {}
    total = 0.0
    from mmcache.fuse.config import load_run_config
    from mmcache.fuse.runs import finished_runs

    for run in finished_runs(runs_dir):
        cfg = load_run_config(run)
        key = stack_key(cfg)  # seed, lr and weight decay change no FLOP
        if key not in per_config:
            per_config[key] = _config_flops(cfg, data)
            step_gflop[cfg.head] = per_config[key][0] / 1e9
        step, fwd = per_config[key]
        epochs = (run.saved_metrics() or {})["epochs_run"]
        # FLOPs are linear in the batch size here, so the short last batch counts as its share of a step
        total += epochs * n["train"] / cfg.batch_size * step + (epochs * n["val"] + sum(n.values())) * fwd
    return {"tflop": total / 1e12, "floor_seconds": total / (gflops_matmul * 1e9), "gflops_matmul": gflops_matmul,
            "step_gflop": step_gflop}


def _config_flops(cfg, data) -> tuple[float, float]:
    """FLOPs of one training step's forward + backward (no optimizer) of ``cfg``'s head at its batch size,
    and of one sample's forward."""
    import torch
    import torch.nn.functional as F
    from mmcache.fuse.engine import build_head

    model = build_head(cfg, data.dims(), data.num_classes).to(data.device)
    rows = data.split_rows["train"][: cfg.batch_size]

    def step() -> None:
        F.cross_entropy(model(*data.batch(rows)), data.labels[rows]).backward()

    def forward() -> None:
        with torch.no_grad():
            model(*data.batch(rows))

    return _flops(step), _flops(forward) / rows.numel()


def _single_steps(cfg, data, members: int, steps: int) -> tuple[float, float]:
    """FLOPs of one train()-style step of one model, and seconds of ``members`` such steps (median)."""
    import torch
    import torch.nn.functional as F
    from mmcache.fuse.engine import adamw, autocast, build_head

    model = build_head(cfg, data.dims(), data.num_classes).to(data.device)
    opt = adamw(model, cfg)
    rows = data.split_rows["train"][: cfg.batch_size]

    def single():
        with autocast(data.device, cfg.amp):  # as train() runs a step
            logits = model(*data.batch(rows))
        loss = F.cross_entropy(logits.float(), data.labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    flops = _flops(single)
    return flops, _median_seconds(lambda: [single() for _ in range(members)], steps)


def _median_seconds(fn, n: int) -> float:
    """Median wall seconds of ``fn()`` after one warm-up; CUDA work is waited for (kernels are async)."""
    import statistics

    import torch

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def bench_grid(tmp: Path, device: str, *, samples: int = 4500, tokens_large: bool = False,
               heads: list[str] | None = None, partial: Path | None = None) -> dict[str, Any]:
    """The grid section; see the module docstring. ``partial``: a JSON file rewritten after every grid, so
    a long section that is stopped (hours of tokens grids on a CPU, a time-limited GPU lease) keeps
    what it measured."""
    from mmcache.fuse.heads import list_heads
    from mmcache.fuse.synthetic import make_cache

    heads = heads or list_heads()
    t0 = time.perf_counter()
    cache = tmp / "gridcache"
    # signal 0.05: a task that is learnable but not solved in an epoch, so early stopping behaves as on real data
    make_cache(cache, "grid", n=samples, dt=768, di=768, lt=128 if tokens_large else 1, li=64 if tokens_large else 1,
               signal=0.05)
    demo = tmp / "demogrid"
    make_cache(demo, "grid", n=600, dt=32, di=32, lt=32, li=64, signal=0.3)
    out: dict[str, Any] = {"samples": samples, "device": device, "load_before": _load(), "cls": [], "tokens": []}

    def keep(kind: str, row: dict[str, Any]) -> None:
        out[kind].append(row)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(out, indent=2, default=str))

    cls = dict(features="cls", seeds=5, base={}, heads=heads)
    keep("cls", _grid("one model per run", cache, tmp / "r1", device, stack=False, **cls))
    keep("cls", _grid("stacked", cache, tmp / "r2", device, stack=True, **cls))
    keep("cls", _grid(f"stacked, --lrs {','.join(f'{x:g}' for x in LRS)}", cache, tmp / "r3", device, stack=True,
                      lrs=LRS, **cls))
    tok = dict(features="tokens", seeds=3, base=DEMO_TRAINING, heads=heads)
    keep("tokens", _grid("demo-sized, one model per run", demo, tmp / "t1", device, stack=False, **tok))
    keep("tokens", _grid("demo-sized, stacked", demo, tmp / "t2", device, stack=True, **tok))
    out["steps"] = step_gflops(cache, device, heads)
    peak = max(x["gflops_matmul"] for x in out["steps"])
    out["cls_floor"] = arithmetic_floor(tmp / "r2", cache, device, peak)
    if tokens_large:
        big = dict(features="tokens", seeds=5, base={}, heads=heads)
        keep("tokens", _grid(f"{samples} posts, one model per run", cache, tmp / "t3", device, stack=False, **big))
        keep("tokens", _grid(f"{samples} posts, stacked", cache, tmp / "t4", device, stack=True, **big))
        out["steps"] += step_gflops(cache, device, heads, steps=2, features="tokens")
    base, stacked, lrs = (x["seconds"] for x in out["cls"])
    out["cls_speedup"] = base / stacked
    out["lrs_cost"] = lrs / stacked
    out["tokens_speedup"] = out["tokens"][0]["seconds"] / out["tokens"][1]["seconds"]
    if tokens_large:
        out["tokens_large_speedup"] = out["tokens"][2]["seconds"] / out["tokens"][3]["seconds"]
    out["load_after"] = _load()
    out["seconds"] = time.perf_counter() - t0
    return out


def format_grid(g: dict[str, Any]) -> list[str]:
    from mmcache.tables import format_table

    def f(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = ["", f"### 5. Ablation grid: stacked vs one model per run (load average {f(g['load_before'], 1)} "
                 f"before, {f(g['load_after'], 1)} after)", ""]
    rows = [[x["features"], x["label"], x["runs"], f(x["seconds"]), x.get("layout") or "-", f(x["peak_rss_mib"], 0)]
            for x in g["cls"] + g["tokens"]]
    lines.append(format_table(["features", "grid", "runs", "wall s", "layout", "peak RSS MiB"], rows))
    lines += ["", f"cls grid speedup from stacking: {g['cls_speedup']:.2f}x; with --lrs (3 values): "
                  f"{g['lrs_cost']:.2f}x the stacked grid's time; demo-sized tokens grid speedup: "
                  f"{g['tokens_speedup']:.2f}x" + (f"; {g['samples']}-post tokens grid speedup: "
                                                    f"{g['tokens_large_speedup']:.2f}x" if "tokens_large_speedup" in g
                                                    else ""), ""]
    fl = g.get("cls_floor")
    if fl:
        lines += [f"cls grid arithmetic: {fl['tflop']:.2f} TFLOP (the stacked grid's runs, as trained); at the plain "
                  f"matmul's {fl['gflops_matmul']:.0f} GFLOP/s that alone is {fl['floor_seconds']:.1f} s", ""]
    lines.append(format_table(
        ["head", "features", "members", "stacked step ms", "single steps ms", "speedup", "GFLOP/s stacked",
         "GFLOP/s single", "GFLOP/s plain matmul"],
        [[x["head"], x.get("features", "cls"), x["members"], f(x["stacked_step_s"] * 1e3),
          f(x["single_steps_s"] * 1e3), f(x["speedup"], 2), f(x["gflops_stacked"]), f(x["gflops_single"]),
          f(x["gflops_matmul"])] for x in g["steps"]]))
    return lines


__all__ = ["bench_grid", "format_grid", "step_gflops"]
