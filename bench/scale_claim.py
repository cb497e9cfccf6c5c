"""Shards that balance themselves, measured: a torchrun launch of 2 gloo ranks with one rank slowed 3x.

Four launches in one run (``python -m torch.distributed.run --standalone --nproc_per_node 2``, CPU,
gloo), text modality, a near-free encoder (:data:`bench.iopath.IO_BERT`: 1 layer, 32-d): fixed shards
(``--no-claim``: rank r extracts rows r/2) and claimed shards (``--num-shards`` :data:`CLAIM_SHARDS`),
each balanced and with rank 1 slowed. The cost of a batch is an injected sleep, so the result measures
the scheduling, not the (shared, noisy) CPU: every rank sleeps :data:`BATCH_SLEEP_S` per text batch, rank
1 three times that when slowed. The sleep is injected by a small wrapper script the bench writes and
launches (it patches :meth:`extract.text_encoder.TextEncoder.forward` in-process, then calls the CLI's
``main``); library code has no hook for it.

What to expect: fixed shards wait for the slow rank (its half costs 3x: work time 3x, the job less where
startup is a large part); claiming shards let the fast rank take more of them. With speeds 1 and 1/3 the
ranks together do 4/3 of one rank's work per second, so the ideal claimed work time is 2 / (4/3) = 1.5x
of the balanced one, plus up to one slow shard of tail; the whole launch's ratio is lower since startup
(imports, process group, model load, merge) is the same in both.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BATCH_SLEEP_S = 0.25  # a balanced batch's cost; rank 1 slowed: 3x. The near-free forward is ~ms: the sleep dominates
SLOW_FACTOR = 3
CLAIM_SHARDS = 16  # 8 per rank: the slow rank's last shard is the tail
BATCH_SIZE = 32
WORDS = "i love this great day but hate the awful rain so sad today with friends".split()

_WRAPPER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from mmcache.extract.text_encoder import TextEncoder
_forward = TextEncoder.forward
_sleep = {sleep!r} * ({slow!r} if os.environ.get("RANK") == "1" else 1)
def forward(self, batch, non_blocking=False):  # the injected per-batch cost (rank 1 slowed when asked)
    time.sleep(_sleep)
    return _forward(self, batch, non_blocking=non_blocking)
TextEncoder.forward = forward
from mmcache.cli import main
sys.exit(main())
"""


def _dataset(root: Path, samples: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        for i in range(samples):
            words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5 + i % 20)]
            w.writerow({"id": f"t{i:05d}", "text": " ".join(words), "image": "",
                        "label": ["positive", "neutral", "negative"][i % 3]})
    return root


def _launch(work: Path, model: Path, data: Path, name: str, slow: int, claim: bool) -> float:
    """Wall seconds of one torchrun launch; raises RuntimeError (with its stderr tail) when it fails."""
    script = work / f"slowed_{slow}.py"
    script.write_text(_WRAPPER.format(repo=str(REPO), sleep=BATCH_SLEEP_S, slow=slow))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    sharding = ["--num-shards", str(CLAIM_SHARDS)] if claim else ["--no-claim"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(script), "extract", "--dataset", "folder", "--data-dir", str(data), "--cache-dir",
           str(work / "cache" / name), "--modality", "text", "--text-model", str(model), "--device", "cpu",
           "--dist-backend", "gloo", "--batch-size", str(BATCH_SIZE), "--threads", "1", "--no-progress", *sharding]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name}: torchrun exited {r.returncode}: {r.stderr[-2000:]}")
    return seconds


def bench_claim(work: Path, samples: int = 2048) -> dict[str, Any]:
    """The four launches (fixed / claim x balanced / slowed) on ``samples`` texts under ``work``: wall
    seconds each and the slowed / balanced ratios."""
    from mmcache.bench.iopath import IO_BERT
    from mmcache.extract.tiny_models import build_bert, full_kwargs, is_complete

    work = Path(work)
    model = work / "models" / "bert-io"
    if not is_complete(model, "bert", full_kwargs(build_bert, IO_BERT)):
        build_bert(model, **IO_BERT)
    data = _dataset(work / "claim_data", samples)
    seconds = {}
    for mode in ("fixed", "claim"):
        for case, slow in (("balanced", 1), ("slowed", SLOW_FACTOR)):
            seconds[f"{mode} {case}"] = _launch(work, model, data, f"{mode}-{case}", slow, mode == "claim")
    return {"samples": samples, "batch_size": BATCH_SIZE, "batch_sleep_s": BATCH_SLEEP_S, "slow_factor": SLOW_FACTOR,
            "claim_shards": CLAIM_SHARDS, "seconds": seconds,
            "ratio": {m: seconds[f"{m} slowed"] / seconds[f"{m} balanced"] for m in ("fixed", "claim")}}


def format_claim(result: dict[str, Any]) -> list[str]:
    """The result as table lines: one row per sharding, balanced / slowed seconds and their ratio."""
    r = result
    out = [f"stage one, torchrun 2 gloo ranks, {r['samples']} texts, batch {r['batch_size']}, "
           f"{r['batch_sleep_s']} s injected per batch, rank 1 slowed {r['slow_factor']}x; "
           f"claim: {r['claim_shards']} shards",
           "| sharding | balanced s | slowed s | slowed / balanced |", "|---|---|---|---|"]
    for mode in ("fixed", "claim"):
        out.append(f"| {mode} | {r['seconds'][f'{mode} balanced']:.1f} | {r['seconds'][f'{mode} slowed']:.1f} | "
                   f"{r['ratio'][mode]:.2f} |")
    return out

