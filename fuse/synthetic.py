"""Synthetic caches (for tests and benchmarks), written with the real cache writer (no encoders).

Each class has a centroid per modality; a sample's tokens are noise plus its class centroid, so every
head can learn the task and overfit it. ``cls`` is token 0, ``mean`` the masked mean, as stage one
stores them. Texts have ragged lengths; images a fixed patch count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcache import cache as cf

CLASSES = ["negative", "neutral", "positive"]


def make_cache(cache_dir: Path, dataset: str = "synth", *, n: int = 60, dt: int = 12, di: int = 16, lt: int = 6,
               li: int = 5, seed: int = 0, classes: list[str] | None = None, text_invalid=(), image_invalid=(),
               text_model: str = "tiny/text-enc", image_model: str = "tiny/image-enc", complete: bool = True,
               extra_text_files: int = 0, signal: float = 2.0,
               all_train: bool = False, targets: dict[str, tuple[list[str], list[int]]] | None = None,
               tasks: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """Write ``cache_dir/<dataset>/{index.h5, text--*.h5, image--*.h5}``; returns their paths.

    Splits: 60% train, 20% val, 20% test by position; ``text_invalid`` / ``image_invalid`` are rows
    written as failures (valid False). ``complete=False`` leaves the image file unfinished;
    ``all_train`` puts every sample in train (no val / test: training needs ``allow_no_val``).
    ``targets`` (name -> (classes, (n,) ids, -1 missing, -2 outside)) and ``tasks`` go into the index as
    stage one writes them, with ``sentiment`` = the labels added as the default target; without them the
    index has no targets (as one written before targets existed).
    """
    classes = classes or CLASSES
    rng = np.random.default_rng(seed)
    ids = [f"{dataset}-{i:04d}" for i in range(n)]
    labels = (np.arange(n) * 7 + seed) % len(classes)
    splits = ["train" if all_train else "train" if i < 0.6 * n else "val" if i < 0.8 * n else "test" for i in range(n)]
    texts = [f"text {i}" for i in range(n)]
    images = [f"img/{i}.png" for i in range(n)]
    folder = Path(cache_dir) / dataset
    tg = None if targets is None else {"sentiment": (classes, labels.tolist()), **targets}
    attrs = None if targets is None else {"default_target": "sentiment", "tasks": tasks or {}}
    fp = cf.write_index(folder / cf.INDEX_NAME, dataset=dataset, classes=classes, ids=ids, labels=labels.tolist(),
                        splits=splits, texts=texts, image_paths=images, targets=tg, attrs=attrs,
                        split_spec={"kind": "synthetic", "rule": "all train" if all_train else "by position 60/20/20"})
    out = {"index": folder / cf.INDEX_NAME}
    centroid_rng = np.random.default_rng(1234)  # same centroids for every dataset: cross-dataset works
    specs = [("text", text_model, dt, lt, text_invalid), ("image", image_model, di, li, image_invalid)]
    specs += [("text", f"{text_model}-v{k + 2}", dt, lt, ()) for k in range(extra_text_files)]
    for modality, model, d, length, invalid in specs:
        centroids = centroid_rng.normal(size=(len(classes), d)).astype(np.float32)
        if modality == "text":
            lens = rng.integers(1, length + 1, size=n)
        else:
            lens = np.full(n, length)
        mask = np.arange(length)[None, :] < lens[:, None]
        tokens = rng.normal(size=(n, length, d)).astype(np.float32) + signal * centroids[labels][:, None, :]
        tokens *= mask[..., None]
        cls = tokens[:, 0]
        mean = tokens.sum(1) / lens[:, None]
        path = cf.feature_path(cache_dir, dataset, modality, model)
        with cf.FeatureWriter.open(path, ids=ids, index_fp=fp, modality=modality, hidden_size=d, num_tokens=length,
                                   dtype="float16", config={"model": model, "max_length": length},
                                   provenance={"model_id": model}) as w:
            keep = np.array([i for i in range(n) if i not in set(invalid)], dtype=np.int64)
            w.write(keep, cls=cls[keep], mean=mean[keep], tokens=tokens[keep], mask=mask[keep])
            w.write_failures(np.asarray(sorted(invalid), dtype=np.int64), ["broken"] * len(invalid))
            if complete or modality == "text":
                w.finalize()
        out.setdefault(modality, path)
    return out
