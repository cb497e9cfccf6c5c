"""Lean caches against full ones: the same generated dataset extracted with the ``small`` preset into a
full cache and a ``--fields cls,mean`` cache, side by side (median of ``repeats``): bytes per sample on
disk and extraction seconds per modality, with the ratio lean / full. Not wired into bench/run.py."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from mmcache.bench.common import make_dataset

VARIANTS = {"full": None, "cls,mean": "cls,mean"}


def _once(data: Path, cache: Path, models: tuple[Path, Path], fields: str | None) -> dict[str, tuple[float, int, float]]:
    """{modality: (seconds of the whole extract incl. model loading, file bytes, samples/s of the encode loop)}"""
    from mmcache.extract.extraction import ExtractConfig, run_extract

    shutil.rmtree(cache, ignore_errors=True)
    s = run_extract(ExtractConfig(dataset="folder", data_dir=data, cache_dir=cache, text_model=str(models[0]),
                                  image_model=str(models[1]), device="cpu", batch_size=32, progress=False,
                                  fields=fields))
    return {m.modality: (m.seconds, m.size_bytes, m.samples_per_s) for m in s.modalities}


def bench_fields(work: Path, samples: int = 256, repeats: int = 3) -> dict:
    """-> {modality: {variant: {"seconds", "bytes_per_sample"}}, "ratio": {...}} (median of ``repeats``)."""
    from mmcache.extract.tiny_models import build_preset

    work = Path(work)
    data = make_dataset(work / "data", samples)
    models = build_preset("small", work / "models")
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for name, fields in VARIANTS.items():  # side by side in each repeat: the same machine load
            runs[name].append(_once(data, work / f"cache-{name.replace(',', '-')}", models, fields))
    out: dict = {"samples": samples, "repeats": repeats}
    for m in ("text", "image"):
        out[m] = {v: {"seconds": statistics.median(r[m][0] for r in runs[v]),
                      "bytes_per_sample": statistics.median(r[m][1] for r in runs[v]) / samples,
                      "loop_sps": statistics.median(r[m][2] for r in runs[v])} for v in VARIANTS}
        out[m]["ratio"] = {k: out[m]["cls,mean"][k] / out[m]["full"][k] for k in ("seconds", "bytes_per_sample", "loop_sps")}
    return out


def format_fields(result: dict) -> list[str]:
    """Table lines: modality, variant, bytes/sample, seconds (whole extract), encode-loop samples/s; then the
    ratio lean / full of each."""
    from mmcache.tables import format_table

    rows = []
    for m in ("text", "image"):
        for v in VARIANTS:
            r = result[m][v]
            rows.append([m, v, f"{r['bytes_per_sample']:,.0f}", f"{r['seconds']:.2f}", f"{r['loop_sps']:.1f}"])
        q = result[m]["ratio"]
        rows.append([m, "lean / full", f"{q['bytes_per_sample']:.3f}", f"{q['seconds']:.3f}", f"{q['loop_sps']:.2f}"])
    head = f"lean caches: {result['samples']} samples, small preset, CPU, median of {result['repeats']}"
    return [head, "", *format_table(["modality", "fields", "bytes/sample", "extract s (incl. load)",
                                     "encode loop samples/s"], rows).split("\n")]


if __name__ == "__main__":
    import sys

    sys.stdout.write("\n".join(format_fields(bench_fields(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-fields")))) + "\n")
