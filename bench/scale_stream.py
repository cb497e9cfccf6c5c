"""Streamed training past the memory budget (issue 23): a self_attention tokens head on (a) a cache that fits
the budget, read into memory, and (b) a cache over 3x the budget, streamed (fuse/stream.py), each trained
in a child process of its own so its peak RSS is its own.

``python -m mmcache.bench.scale_stream [WORK]`` prints the table; :func:`bench_stream` returns the numbers.
Samples/s: training samples per second of epoch time (``history.json`` ``seconds``: the training steps
plus the validation pass of each epoch, the same in both). Peak RSS: ``VmHWM`` of the child
(``ru_maxrss`` is inherited over exec, so it is not used) and over the child's baseline, its RSS after a
warm-up run on a 40-sample cache (imports, thread pools), which no budget can shrink. The caches are written
just before, so the streamed reads come from the OS page cache (the budget bounds the process, not the page
cache); cold-disk throughput is a property of the disk, not measured here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from mmcache import cache as cf

__all__ = ["bench_stream", "format_stream", "write_cache"]

_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["negative", "neutral", "positive"]


def write_cache(cache_dir: Path, dataset: str, n: int, *, dim: int = 512, length: int = 64, seed: int = 0) -> int:
    """A synthetic tokens cache of ``n`` samples (text + image, ``length`` x ``dim`` float16 each), written
    with the real FeatureWriter in 256-row batches from a bank of noise rows plus class centroids (fast:
    no (n, L, D) float32 array). Returns the bytes of the feature files."""
    rng = np.random.default_rng(seed)
    ids = [f"{dataset}-{i:06d}" for i in range(n)]
    labels = np.arange(n) % len(CLASSES)
    splits = ["train" if i % 10 < 6 else "val" if i % 10 < 8 else "test" for i in range(n)]
    folder = Path(cache_dir) / dataset
    fp = cf.write_index(folder / cf.INDEX_NAME, dataset=dataset, classes=CLASSES, ids=ids, labels=labels.tolist(),
                        splits=splits, texts=[f"t{i}" for i in range(n)], image_paths=[f"i{i}.png" for i in range(n)],
                        split_spec={"kind": "synthetic", "rule": "6/2/2 by position"})
    total = 0
    for modality in ("text", "image"):
        centroids = np.random.default_rng(1234).normal(size=(len(CLASSES), dim)).astype(np.float32)
        bank = rng.normal(size=(257, length, dim)).astype(np.float32)
        path = cf.feature_path(cache_dir, dataset, modality, f"bench/{modality}")
        with cf.FeatureWriter.open(path, ids=ids, index_fp=fp, modality=modality, hidden_size=dim, num_tokens=length,
                                   dtype="float16", config={"model": f"bench/{modality}", "max_length": length},
                                   provenance={"model_id": f"bench/{modality}"}) as w:
            for a in range(0, n, 256):
                rows = np.arange(a, min(n, a + 256))
                tokens = bank[rows % 257] + 0.7 * centroids[labels[rows]][:, None, :]
                mask = np.ones((rows.size, length), dtype=bool)
                w.write(rows, cls=tokens[:, 0], mean=tokens.mean(1), tokens=tokens, mask=mask)
            w.finalize()
        total += path.stat().st_size
    return total


_CHILD = textwrap.dedent("""
    import json, sys
    from mmcache.fuse.train import TrainConfig, train

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    args = json.loads(sys.argv[1])
    run = dict(head="self_attention", features="tokens", dim=args["dim"], heads=4, epochs=args["epochs"],
               batch_size=32, eval_batch_size=32, patience=0, device="cpu", threads=args["threads"],
               cache_dir=args["cache"], runs_dir=args["cache"] + "/runs", max_memory=args["budget"])
    train(TrainConfig(**{**run, "dataset": "warm", "epochs": 1}))  # imports, thread pools: the baseline
    base = status("VmRSS")
    res = train(TrainConfig(**{**run, "dataset": args["dataset"]}))
    seconds = sum(r["seconds"] for r in res.history)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "seconds": seconds,
                      "samples_per_s": args["n_train"] * len(res.history) / seconds,
                      "test_accuracy": res.metrics["test"]["accuracy"]}))
""")


def _child(cache: Path, dataset: str, n: int, budget: int, epochs: int, dim: int, threads: int) -> dict[str, Any]:
    args = {"cache": str(cache), "dataset": dataset, "budget": budget, "epochs": epochs, "dim": dim,
            "threads": threads, "n_train": sum(1 for i in range(n) if i % 10 < 6)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=_ROOT, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_stream(work: Path, *, budget: int = 300 << 20, fit_n: int = 1200, big_n: int = 7400, dim_tokens: int = 512,
                 length: int = 64, epochs: int = 2, dim: int = 128, threads: int = 1) -> dict[str, Any]:
    """Train on a cache that fits ``budget`` (``fit_n`` samples, in memory) and on one over 3x it (``big_n``,
    streamed with ``budget``); returns both runs' samples/s, their ratio, peak RSS and the sizes."""
    cache = Path(work) / "cache"
    sizes = {"warm": write_cache(cache, "warm", 40, dim=dim_tokens, length=length),
             "fit": write_cache(cache, "fit", fit_n, dim=dim_tokens, length=length),
             "big": write_cache(cache, "big", big_n, dim=dim_tokens, length=length)}
    if sizes["fit"] > budget or sizes["big"] < 3 * budget:
        raise ValueError(f"sizes do not fit the bench's premise: {sizes} vs budget {budget}")
    out: dict[str, Any] = {"budget": budget, "cache_bytes": sizes, "epochs": epochs, "dim": dim, "threads": threads,
                           "tokens": [length, dim_tokens]}
    out["memory"] = _child(cache, "fit", fit_n, budget, epochs, dim, threads)
    out["streamed"] = _child(cache, "big", big_n, budget, epochs, dim, threads)
    out["ratio"] = out["streamed"]["samples_per_s"] / out["memory"]["samples_per_s"]
    return out


def format_stream(result: dict[str, Any]) -> list[str]:
    """The bench's table (markdown lines)."""
    mib = 2 ** 20
    b = result["budget"]
    lines = [f"Streamed training, self_attention on tokens {result['tokens'][0]}x{result['tokens'][1]} float16 x 2 "
             f"modalities, dim {result['dim']}, {result['epochs']} epochs, {result['threads']} thread(s); "
             f"budget {b / mib:.0f} MiB",
             "", "| run | cache MiB | x budget | samples/s | peak RSS MiB | over baseline MiB | under budget |",
             "|---|---|---|---|---|---|---|"]
    for key, label, cache in (("memory", "in memory (fits)", "fit"), ("streamed", "streamed", "big")):
        r, size = result[key], result["cache_bytes"][cache]
        over = r["peak"] - r["base"]
        lines.append(f"| {label} | {size / mib:.0f} | {size / b:.1f} | {r['samples_per_s']:.1f} | {r['peak'] / mib:.0f} "
                     f"| {over / mib:.0f} | {'yes' if over < b else 'NO'} |")
    lines += ["", f"streamed / in-memory samples/s: {result['ratio']:.2f} (target >= 0.7)"]
    return lines


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="scale_stream-"))
    sys.stdout.write("\n".join(format_stream(bench_stream(target))) + "\n")
