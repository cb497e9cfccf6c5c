"""`bench --only scale` (bench/scale.py): the at-scale projection is computed from the cache layout and the
measured rates it is given, and the merge measurement runs end to end on tiny shards."""

from __future__ import annotations

import pytest
from mmcache.bench.scale import FIELD_SETS, POSTS, at_scale, format_at_scale
from mmcache.bench.scale_merge import bench_merge, format_merge

from mmcache.cache.integrity import planned_bytes


def _fields(ratio_text: float, ratio_image: float) -> dict:
    return {m: {"ratio": {"seconds": r}} for m, r in (("text", ratio_text), ("image", ratio_image))}


def test_at_scale_bytes_follow_the_layout_and_hours_the_measured_ratio():
    r = at_scale(_fields(0.5, 1.0), {"read_gbps": 2.0})
    rows = {x["fields"]: x for x in r["rows"]}
    full, lean = rows["cls,mean,tokens (default)"], rows["cls,mean"]
    per_row = (planned_bytes(1000, 768, 128, "float16") - planned_bytes(0, 768, 128, "float16")) / 1000
    assert full["bytes_per_post"]["text"] == pytest.approx(per_row, rel=1e-2)
    assert full[f"tb_{POSTS[1]}"] == pytest.approx(10 * full[f"tb_{POSTS[0]}"])
    assert lean[f"tb_{POSTS[0]}"] < full[f"tb_{POSTS[0]}"] / 50  # tokens are nearly all of a cache
    assert list(rows) == list(FIELD_SETS)
    if r["gpu"]:  # the GPU rates kept in docs/: text hours halve with a lean/full ratio of 0.5
        g = r["gpu"]
        want = POSTS[0] / g["text"]["ours_sps"] * 0.5 + POSTS[0] / g["image"]["ours_sps"]
        assert lean[f"gpu_hours_{POSTS[0]}"] == pytest.approx(want / 3600)
    assert r["stream_epoch_hours"][POSTS[1]] == pytest.approx(10 * r["stream_epoch_hours"][POSTS[0]])
    text = "\n".join(format_at_scale(r))
    assert "cls,mean" in text and "10M posts TB" in text


def test_merge_bench_on_tiny_shards(tmp_path):
    r = bench_merge(tmp_path / "m", shards=2, rows_per_shard=40, hidden=8, tokens=4, repeats=1)
    assert r["rows"] == 80 and r["virtual"]["extra_bytes"] < r["copy"]["extra_bytes"]
    assert r["virtual"]["cls_gbps"] > 0 and "virtual (default)" in "\n".join(format_merge(r))
