"""Apply a trained head to new posts: both stages in one call (neutral ground, like the CLI).

:class:`Predictor` rebuilds the encoders a run's caches were made with from their recorded provenance
(:func:`_load_verified_encoder`, the one place that loads stage-one encoders) and proves they are the
same (weights hash or hub commit, tokenizer and processor settings, pooling, layer), encodes the posts
through stage one's own extraction path into a normal cache (a temporary one unless
``cache_features`` is given), then runs the head through stage two's own batching and prediction.
So the probabilities for a run's own test posts equal its ``predictions.csv``.

A post whose text or image fails gets a row with the reason. Heads that attend over whatever tokens
are there (:attr:`~mmcache.fuse.heads.FusionHead.handles_missing`) answer from the remaining modality;
that row is marked in ``note``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcache.csvsafe import csv_dict
from mmcache.errors import BadInputError
from mmcache.posts import Post, posts_from_lists

log = logging.getLogger(__name__)

__all__ = ["PredictionResult", "Predictor", "encode_posts", "recorded_tokenizer"]

MODALITY_ORDER = ("text", "image")



@dataclass
class PredictionResult:
    """Per post: ``rows`` (dicts with ``id``, ``true`` when labelled, ``predicted``, ``p_<class>``,
    ``note``), the probabilities (N, C) float32 (NaN rows where no answer), and metrics when labels
    are present."""

    classes: list[str]
    rows: list[dict[str, Any]]
    probs: np.ndarray
    metrics: dict[str, Any] | None = None
    cache_dir: Path | None = None  # where the encoded posts were kept (cache_features)
    scored: dict[str, Any] | None = None  # encoders used (path + identity), n scored, n dropped by reason

    @property
    def labelled(self) -> bool:
        return any(r.get("true") for r in self.rows)

    def columns(self) -> list[str]:
        head = ["id", "true", "predicted"] if self.labelled else ["id", "predicted"]
        return [*head, *(f"p_{c}" for c in self.classes), "note"]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow(csv_dict({k: (f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v))
                                 for k, v in r.items()}))  # ids, texts and reasons come from the data
        return buf.getvalue()

    def to_jsonl(self) -> str:
        cols = self.columns()
        return "".join(json.dumps({k: r.get(k) for k in cols}) + "\n" for r in self.rows)

    def write(self, path: str | Path) -> Path:
        """``.csv`` or ``.jsonl`` by the file name."""
        from mmcache.common import atomic_write

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise BadInputError(f"--output must end in .csv or .jsonl, got {path.name!r}")
        atomic_write(path, self.to_csv() if suffix == ".csv" else self.to_jsonl())
        return path


# --------------------------------------------------------------------------------------------- stage one

def _load_verified_encoder(modality: str, recorded: dict[str, Any], device: str):
    """Rebuild the encoder a cache file was made with (``recorded``: the run's record of that file, with
    its ``config`` and ``provenance``) and prove it is the same one (stage one's
    :func:`~mmcache.extract.encoders.load_encoder_from_provenance`: weights hash or hub commit,
    tokenizer / processor settings, pooling, layer). Returns ``(encoder, ExtractConfig)`` set up to
    write a file with the recorded storage settings."""
    from mmcache.cache import EncoderSpec
    from mmcache.extract.config import ExtractConfig
    from mmcache.extract.encoders import load_encoder_from_provenance

    conf = recorded.get("config") or {}
    spec = EncoderSpec.from_provenance(modality, recorded.get("provenance"), conf)
    enc = load_encoder_from_provenance(spec, config=conf, device=device)
    from mmcache.extract.identity import decode_mode

    return enc, ExtractConfig(dataset="predict", dtype=conf.get("dtype", "float16"), precision=enc.precision,
                              device=device, decode=decode_mode(conf.get("decode")) or "full",
                              **spec.extract_options())


def recorded_tokenizer(run: str | Path):
    """A function texts -> token strings (or a None per text when the tokenizer cannot be loaded: reports
    then show token positions), from the tokenizer the run's text cache recorded (the same source and
    revision rule as its encoder: :class:`~mmcache.cache.EncoderSpec`); None when the run has no text
    cache. The tokenizer is loaded on first use: a command that refuses the run never loads it."""
    from mmcache.cache import EncoderSpec
    from mmcache.fuse.runs import RunFolder

    rec = (RunFolder(run).provenance().get("caches") or {}).get("text") or {}
    spec = EncoderSpec.from_provenance("text", rec.get("provenance"), rec.get("config"))
    if not spec.source:
        return None
    loaded: dict[str, Any] = {}

    def tokenizer():
        if "tok" not in loaded:
            try:
                from mmcache.extract.encoders import load_tokenizer

                loaded["tok"] = load_tokenizer(spec)
            except Exception as e:  # noqa: BLE001 -- optional: the analysis still runs with token positions
                log.warning("token strings unavailable (%s): showing token positions", e)
                loaded["tok"] = None
        return loaded["tok"]

    def tokenize(texts: list[str]) -> list[list[str] | None]:
        tok = tokenizer()
        if tok is None:
            return [None] * len(texts)
        ids = tok(list(texts), truncation=True, max_length=int(spec.max_length or 128))["input_ids"]
        return [tok.convert_ids_to_tokens(x) for x in ids]

    return tokenize


def _save_image(img: Any, folder: Path, i: int) -> str:
    """A PIL image given in memory -> a lossless PNG the extraction path reads like any file."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"post{i}.png"
    img.save(p, format="PNG")
    return str(p)


def _refuse_other_posts(folder: Path, fingerprint: str) -> None:
    """A cache folder that already holds other posts is never overwritten (its features would no
    longer match its index): the same posts again are fine (their features are reused)."""
    from mmcache import cache as cf

    path = folder / cf.INDEX_NAME
    if path.is_file() and cf.read_index(path).fingerprint != fingerprint:
        raise BadInputError(f"{folder} already holds a cache of other posts; give --cache-features another folder")


def encode_posts(posts: list[Post], recorded: dict[str, dict[str, Any]], classes: list[str], cache_dir: Path,
                 name: str, *, device: str = "cpu", batch_size: int = 32,
                 num_workers: int | None = None) -> dict[str, Path]:
    """Encode ``posts`` with the encoders ``recorded`` (modality -> the run's record of its cache file:
    ``config``, ``provenance``) into a normal cache ``cache_dir/name/`` (index.h5 + one feature file per
    modality), through stage one's own extraction code. Unlabelled posts get label -1 in the index.
    Returns the feature file written per modality."""
    from mmcache import cache as cf
    from mmcache.extract.extraction import IndexInfo, extract_shard

    folder = Path(cache_dir) / name
    files: list[str | None] = []
    for i, p in enumerate(posts):
        if p.image is None or "image" in p.problem:
            files.append(None)
        elif isinstance(p.image, (str, Path)):
            files.append(str(Path(p.image).expanduser().resolve()))
        elif hasattr(p.image, "save"):
            files.append(_save_image(p.image, folder / "images", i))
        else:
            raise BadInputError(f"post {p.id}: image must be a path or a PIL image, got {type(p.image).__name__}")
    ids = [p.id for p in posts]
    texts = [p.text for p in posts]
    labels = [classes.index(p.label) if p.label in classes else -1 for p in posts]
    _refuse_other_posts(folder, cf.index_fingerprint(ids, texts, [f or "" for f in files]))
    fp = cf.write_index(folder / cf.INDEX_NAME, dataset=name, classes=classes, ids=ids, labels=labels,
                        splits=["test"] * len(posts), texts=texts, image_paths=[f or "" for f in files],
                        attrs={"root": "/", "reader": "predict"})
    index = IndexInfo(path=folder / cf.INDEX_NAME, dataset_dir=folder, status="written", fingerprint=fp,
                      num_samples=len(posts), ids=ids, texts=texts, image_files=files)
    workers = num_workers if num_workers is not None else (0 if len(posts) < 64 else 2)
    files_written: dict[str, Path] = {}
    for modality in ("image", "text"):  # image first: the DataLoader forks before the tokenizer's threads
        if modality not in recorded:
            continue
        enc, cfg = _load_verified_encoder(modality, recorded[modality], device)
        cfg.cache_dir, cfg.name, cfg.batch_size, cfg.num_workers = cache_dir, name, batch_size, workers
        cfg.progress = False
        files_written[modality] = Path(extract_shard(cfg, modality, index=index, encoder=enc).path)
        del enc
    return files_written


# --------------------------------------------------------------------------------------------- stage two

def _moved(modality: str, recorded: dict[str, Any], folder: str | Path | None) -> dict[str, Any]:
    """The run's record of a cache file, pointed at ``folder`` (an encoder that moved) when given. The
    identity check of :func:`_load_verified_encoder` still compares its weights with the record."""
    if folder is None:
        return recorded
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise BadInputError(f"--{modality}-model {folder}: no such folder")
    return {**recorded, "provenance": {**(recorded.get("provenance") or {}), "resolved_path": str(path)}}


def _failure_reasons(path: Path) -> dict[str, str]:
    from mmcache import cache as cf

    with cf.FeatureFile(path) as ff:
        return dict(ff.failures())


class Predictor:
    """A finished run, ready to label new posts. Build with :meth:`from_run`.

    >>> p = Predictor.from_run("runs/demo-basic-mean-s0-...")            # doctest: +SKIP
    >>> p.predict(texts=["sunny day, love it"], images=["beach.jpg"]).rows  # doctest: +SKIP
    """

    def __init__(self, run_dir: Path, model, config, meta: dict[str, Any], provenance: dict[str, Any],
                 device: str = "cpu", calibrated: bool = False, encoders: dict[str, str | Path | None] | None = None,
                 ) -> None:
        from mmcache.fuse.heads import head_uses

        self.run_dir, self.model, self.config, self.meta = run_dir, model, config, meta
        targets = meta["model"].get("targets") or {}
        if len(targets) > 1:
            raise BadInputError(f"run {run_dir} predicts the task {meta.get('target')!r} ({', '.join(targets)}); "
                                "predict and analyze take single-target runs")
        self.target: str | None = meta.get("target")
        self.classes: list[str] = list(meta["model"]["classes"])
        self.uses = tuple(m for m in MODALITY_ORDER if m in head_uses(config.head))
        caches = provenance.get("caches") or {}
        missing = [m for m in self.uses if not ((caches.get(m) or {}).get("config") and caches[m].get("provenance"))]
        if missing:
            raise BadInputError(f"run {run_dir}: provenance.json records no {', '.join(missing)} encoder")
        self.recorded = {m: _moved(m, caches[m], (encoders or {}).get(m)) for m in self.uses}
        self.device = device
        self.temperature: float | None = None
        if calibrated:
            from mmcache.fuse.runs import RunFolder

            cal = RunFolder(run_dir).calibration()
            if cal is None:
                raise BadInputError(f"run {run_dir} has no fitted temperature (none yet, or analyze could not fit "
                                    f"one); run `analyze --run {run_dir}` first")
            self.temperature = float(cal["temperature"])

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", calibrated: bool = False,
                 text_model: str | Path | None = None, image_model: str | Path | None = None) -> Predictor:
        """Load a finished run (manifest checked: :func:`~mmcache.fuse.scoring.load_head`), its head,
        classes and the encoders its caches record. ``text_model`` / ``image_model``: the encoder's
        folder when it moved since extraction; its identity (weights sha256 ...) must still be the
        recorded one, else :class:`BadInputError`."""
        from mmcache.common import resolve_device
        from mmcache.fuse.runs import RunFolder
        from mmcache.fuse.scoring import load_head

        folder = RunFolder(run_dir)
        dev = str(resolve_device(device))
        model, config, meta = load_head(folder, dev)
        return cls(folder.path, model, config, meta, folder.provenance(), device=dev, calibrated=calibrated,
                   encoders={"text": text_model, "image": image_model})

    # -- public
    def predict(self, texts: Sequence[str] | None = None, images: Sequence[Any] | None = None, *,
                ids: Sequence[str] | None = None, labels: Sequence[str] | None = None, **kw) -> PredictionResult:
        """Label posts given as parallel lists (``images``: paths or PIL images). See :meth:`predict_posts`."""
        return self.predict_posts(posts_from_lists(texts, images, ids, labels), **kw)

    def predict_posts(self, posts: list[Post], *, cache_features: str | Path | None = None, name: str = "posts",
                      batch_size: int = 32, num_workers: int | None = None) -> PredictionResult:
        """Encode ``posts`` (into ``cache_features/name/`` when given, else a temporary cache) and label
        them: one row per post, in order."""
        if cache_features is not None:
            return self._predict_in(posts, Path(cache_features), name, batch_size, num_workers)
        with tempfile.TemporaryDirectory(prefix="mmcache-predict-") as tmp:
            result = self._predict_in(posts, Path(tmp), name, batch_size, num_workers)
        result.cache_dir = None
        return result

    # -- internals
    def _predict_in(self, posts: list[Post], cache_dir: Path, name: str, batch_size: int,
                    num_workers: int | None) -> PredictionResult:
        from mmcache import cache as cf

        encodable = [p for p in posts if "post" not in p.problem]
        probs = np.full((len(posts), len(self.classes)), np.nan, dtype=np.float32)
        notes = {p.id: p.problem["post"] for p in posts if "post" in p.problem}
        if encodable:
            files = encode_posts(encodable, self.recorded, self.classes, cache_dir, name, device=self.device,
                                 batch_size=batch_size, num_workers=num_workers)
            index = cf.read_index(cache_dir / name / cf.INDEX_NAME)
            got, more = self._apply_head(files, index, encodable)
            pos = {p.id: i for i, p in enumerate(posts)}
            for sid, row in zip(index.ids.tolist(), got, strict=True):
                probs[pos[sid]] = row
            notes.update(more)
        rows = self._rows(posts, probs, notes)
        return PredictionResult(classes=self.classes, rows=rows, probs=probs, metrics=self._metrics(rows, probs),
                                cache_dir=cache_dir / name, scored=self._scored(rows))

    def _scored(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """What was scored: the run, each encoder (folder + identity), n answered, n without an answer by
        reason (the row's note)."""
        from collections import Counter

        from mmcache import cache as cf

        encoders = {}
        for m, rec in self.recorded.items():
            conf, prov = rec.get("config") or {}, rec.get("provenance") or {}
            encoders[m] = {"path": prov.get("resolved_path") or prov.get("model_id") or conf.get("model"),
                           "weights_sha256": conf.get("weights_sha256"), "commit_hash": conf.get("commit_hash"),
                           "config_fingerprint": cf.fingerprint(conf) if conf else None}
        dropped = Counter(r["note"] or "no answer" for r in rows if r["predicted"] is None)
        return {"run": str(self.run_dir), "encoders": encoders, "n_scored": sum(r["predicted"] is not None for r in rows),
                "n_dropped": sum(dropped.values()), "dropped_by_reason": dict(dropped),
                "calibrated": self.temperature is not None}

    def _load_encoded(self, files: dict[str, Path], index, posts: list[Post]):
        """The encoded posts as stage-two data (a failed modality = an all-padding row), the index rows
        the head can answer, and notes by post id."""
        import torch

        from mmcache import cache as cf
        from mmcache.fuse.data import FusionData, _load_modality

        loaded, reasons = {}, {}
        folder = files[self.uses[0]].parent
        for m in self.uses:
            loaded[m] = _load_modality(files[m], m, index, self.config.features, folder.name)
            reasons[m] = _failure_reasons(files[m])
        valid = {m: md.valid.clone() for m, md in loaded.items()}
        for md in loaded.values():
            md.mask[~md.valid] = False  # a failed modality is an all-padding row: no real token
        data = FusionData(dataset=folder.name, classes=self.classes, features=self.config.features,
                          modalities=self.uses, ids=index.ids, labels=torch.from_numpy(index.labels),
                          split_rows={}, text=loaded.get("text"), image=loaded.get("image"),
                          index_path=folder / cf.INDEX_NAME, index_fingerprint=index.fingerprint)
        data.to(self.device)
        notes, answer = {}, []
        handles = getattr(self.model, "handles_missing", False)
        for r, p in enumerate(posts):
            bad = {m: p.problem.get(m) or reasons[m].get(p.id, "missing") for m in self.uses if not bool(valid[m][r])}
            why = "; ".join(f"{m}: {w}" for m, w in bad.items())
            if not bad:
                answer.append(r)
            elif handles and len(bad) < len(self.uses):
                answer.append(r)
                left = next(m for m in self.uses if m not in bad)
                notes[p.id] = f"answered from {left} only ({why})"
            else:
                notes[p.id] = why
        return data, answer, notes

    def _apply_head(self, files: dict[str, Path], index, posts: list[Post]) -> tuple[np.ndarray, dict[str, str]]:
        """(N, C) probabilities in index order (NaN: no answer) and notes by post id."""
        import torch

        from mmcache.fuse.engine import predict

        data, answer, notes = self._load_encoded(files, index, posts)
        probs = np.full((len(posts), len(self.classes)), np.nan, dtype=np.float32)
        if answer:
            rows = torch.as_tensor(answer, dtype=torch.long, device=data.device)
            out = predict(self.model, data, rows, self.config.eval_batch_size, self.config.amp)
            if self.temperature is not None:
                from mmcache.fuse.analyze import apply_temperature

                out = apply_temperature(out, self.temperature)
            probs[answer] = out
        return probs, notes

    def explain(self, texts: Sequence[str] | None = None, images: Sequence[Any] | None = None, *,
                ids: Sequence[str] | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
        """Prediction plus attention for each post (attention heads only): ``text_share`` /
        ``image_share`` (see :mod:`mmcache.fuse.analyze`), ``tokens`` with ``text_weights``, and
        ``image_weights`` over the patch ``grid`` (row-major) for ``tokens`` features."""
        import torch

        from mmcache import cache as cf
        from mmcache.fuse.analyze import attention_maps, explaining_heads

        if not self.model.explains:
            raise BadInputError(f"explain needs an attention head ({', '.join(explaining_heads())}); this run is "
                                f"{self.config.head!r}")
        posts = posts_from_lists(texts, images, ids)
        with tempfile.TemporaryDirectory(prefix="mmcache-explain-") as tmp:
            files = encode_posts(posts, self.recorded, self.classes, Path(tmp), "posts", device=self.device,
                                 batch_size=batch_size, num_workers=0)
            index = cf.read_index(Path(tmp) / "posts" / cf.INDEX_NAME)
            out = self._rows(posts, *self._apply_head(files, index, posts))
            data, answer, _notes = self._load_encoded(files, index, posts)
            if not answer:
                return out
            att = attention_maps(self.model, data, torch.as_tensor(answer, device=data.device))
        tokenize = recorded_tokenizer(self.run_dir)
        tokens = tokenize([posts[r].text for r in answer]) if tokenize else [None] * len(answer)
        grid = (self.recorded.get("image") or {}).get("grid") or ((self.recorded.get("image") or {}).get("config") or {}).get("grid")
        for k, r in enumerate(answer):
            tw = np.asarray(att["text_weights"][k])
            toks = tokens[k] if tokens[k] is not None and len(tokens[k]) == tw.size else [f"#{j}" for j in range(tw.size)]
            out[r].update(text_share=att["text_share"][k], image_share=att["image_share"][k], tokens=toks,
                          text_weights=tw.tolist(), image_weights=np.asarray(att["image_weights"][k]).tolist(),
                          grid=grid)
        return out

    def _rows(self, posts: list[Post], probs: np.ndarray, notes: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for p, pr in zip(posts, probs, strict=True):
            ok = bool(np.isfinite(pr).all())
            row: dict[str, Any] = {"id": p.id, "true": p.label, "predicted": self.classes[int(pr.argmax())] if ok else None}
            row.update({f"p_{c}": (float(v) if ok else None) for c, v in zip(self.classes, pr, strict=True)})
            note = notes.get(p.id, "")
            if p.label is not None and p.label not in self.classes:
                note = "; ".join(x for x in (note, f"label {p.label!r} is not one of the run's classes") if x)
            row["note"] = note
            rows.append(row)
        return rows

    def _metrics(self, rows: list[dict[str, Any]], probs: np.ndarray) -> dict[str, Any] | None:
        from mmcache.fuse.metrics import compute_metrics

        scored = [i for i, r in enumerate(rows) if r["true"] in self.classes and r["predicted"] is not None]
        if not scored:
            return None
        y = np.asarray([self.classes.index(rows[i]["true"]) for i in scored])
        m = compute_metrics(y, probs[scored].argmax(-1), self.classes)
        m["scored"], m["unanswered"] = len(scored), sum(r["predicted"] is None for r in rows)
        return m
