"""Scoring a finished run again (``evaluate``): on its own split, another split, or another dataset's
cache made with the same encoders and classes (cross-dataset evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcache.fuse.data import FusionData
from mmcache.fuse.engine import deterministic, predict
from mmcache.fuse.runs import predictions_csv, write_json
from mmcache.fuse.scoring import SPLIT_CHOICES, load_head, open_for_scoring
from mmcache.fuse.targets import score_targets

from mmcache.common import atomic_write

__all__ = ["SPLIT_CHOICES", "EvalResult", "evaluate", "load_head"]


@dataclass
class EvalResult:
    """What :func:`evaluate` returns."""

    run_dir: Path
    dataset: str
    split: str
    metrics: dict[str, Any]
    dropped: dict[str, Any]
    predictions_path: Path | None
    metrics_path: Path | None


def evaluate(run_dir: str | Path, dataset: str | None = None, split: str = "test", *,
             cache_dir: str | Path | None = None, text_cache: str | Path | None = None,
             image_cache: str | Path | None = None, device: str | None = None, data: FusionData | None = None,
             write: bool = True, split_choice: str | None = None, target: str | None = None,
             max_memory: int | None = None) -> EvalResult:
    """Score a finished run again on ``split`` of its own dataset, or of ``dataset`` (cross-dataset).

    The run and its data come through the one door, :func:`fuse.scoring.open_for_scoring` (manifest,
    the run's recorded absolute cache root unless ``cache_dir`` is given, encoder identity, classes,
    split). The other dataset's caches must come from the same encoders and have the same classes, in
    the same order; otherwise :class:`BadInputError`. ``target``: score against another target (or
    task) than the run's own (None), e.g. MVSA ``image_label`` for a ``sentiment`` run; its classes must
    equal the run's. With ``write``, the metrics and predictions go to
    ``<run>/evaluations/<dataset>-<split>[-<target>].json|.csv`` (the target named when not the run's).

    On its own dataset the run's split (``split.json``) must still be the cache's: after a re-split
    the run is stale and this raises :class:`BadInputError`, unless ``split_choice`` is ``"original"``
    (score the run's own ``split`` ids) or ``"current"`` (the cache's current split, labelled as a
    different split in the metrics and the file name: ``<dataset>-<split>-current-<fingerprint>``).
    The metrics say what was scored: ``scored`` (feature files with their identity, n scored, n dropped
    by reason). ``max_memory``: as for :func:`fuse.data.load_data` (over it, the features are streamed).
    """
    sc = open_for_scoring(run_dir, dataset=dataset, split=split, cache_dir=cache_dir, text_cache=text_cache,
                          image_cache=image_cache, split_choice=split_choice, target=target, device=device,
                          data=data, max_memory=max_memory)
    config, data, rows, scored = sc.config, sc.data, sc.rows, sc.scored
    with deterministic(sc.device, config.threads):
        probs = predict(sc.model, data, rows, config.eval_batch_size, config.amp)
    rows_np = rows.cpu().numpy()
    labels = data.target_labels.cpu().numpy()[rows_np]
    metrics = score_targets(probs, labels, data.target)
    metrics.update(dataset=data.dataset, split=split, run=sc.run.name, trained_on=config.dataset,
                   trained_target=sc.run_target, dropped=data.dropped, split_scored=scored,
                   scored=sc.what_was_scored())
    mpath = ppath = None
    if write:
        stem = f"{data.dataset}-{split}" + (f"-current-{scored['fingerprint']}" if scored["which"] == "current" else "")
        stem += f"-{data.target.name}" if target and data.target.name != sc.run_target else ""
        ppath, mpath = sc.run.evaluation_paths(stem)
        atomic_write(ppath, predictions_csv(data.ids[rows_np], labels, probs, data.target))
        write_json(mpath, metrics)
    return EvalResult(run_dir=sc.run.path, dataset=data.dataset, split=split, metrics=metrics, dropped=data.dropped,
                      predictions_path=ppath, metrics_path=mpath)
