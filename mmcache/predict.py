"""Apply a trained head to new posts: both stages in one call (neutral ground, like the CLI).

:class:`Predictor` rebuilds the encoders a run's caches were made with from their recorded provenance
(:func:`_load_verified_encoder`, the one place that loads stage-one encoders) and proves they are the
same (weights hash or hub commit, tokenizer and processor settings, pooling, layer), encodes the posts
through stage one's own batch loops (:func:`~mmcache.extract.batches.run_text` / ``run_image``) straight
into arrays in the cache's storage dtype (a normal cache on disk only when ``cache_features`` is given),
then runs the head through stage two's own batching and prediction. So the probabilities for a run's
own test posts equal its ``predictions.csv``. Library calls are quiet unless ``verbose=True``.

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
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    files = _image_files(posts, folder / "images")
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


class _MemoryFeatures:
    """Stands in for stage one's :class:`~mmcache.cache.FeatureWriter` (the two methods its batch loops
    call): encoded posts land in arrays instead of an HDF5 file. Values arrive already cast to the
    storage dtype (``to_host``), so they are the numbers a cache file would hold.

    ``arrays``: ``cls`` / ``mean`` (N, D), ``tokens`` (N, L, D) right-padded with zeros, ``mask``
    (N, L) bool (True = real token), ``proj`` (N, P) when the encoder has one; ``valid`` (N,) bool;
    ``reasons``: row -> why it failed."""

    def __init__(self, n: int, length: int, d: int, dtype: str, proj_size: int | None) -> None:
        self.arrays = {"cls": np.zeros((n, d), dtype), "mean": np.zeros((n, d), dtype),
                       "tokens": np.zeros((n, length, d), dtype), "mask": np.zeros((n, length), bool)}
        if proj_size:
            self.arrays["proj"] = np.zeros((n, proj_size), dtype)
        self.valid = np.zeros(n, bool)
        self.reasons: dict[int, str] = {}

    def write(self, rows: np.ndarray, *, cls, mean, tokens, mask, proj=None) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        t = mask.shape[1]
        a = self.arrays
        a["cls"][rows], a["mean"][rows] = cls, mean
        a["tokens"][rows, :t], a["mask"][rows, :t] = tokens, mask
        if proj is not None:
            a["proj"][rows] = proj
        self.valid[rows] = True

    def write_failures(self, rows: np.ndarray, reasons: list[str]) -> None:
        for r, why in zip(np.asarray(rows).tolist(), reasons, strict=True):
            self.reasons[int(r)] = why
            self.valid[int(r)] = False


def _encode_modality(modality: str, enc, cfg, texts: list[str], files: list[str | None]) -> _MemoryFeatures:
    """One modality of the posts through stage one's batch loop, into memory."""
    import torch

    from mmcache.extract.batches import progress_bar, run_image, run_text
    from mmcache.extract.extraction import TOKEN_LAYOUT, torch_threads

    n = len(texts)
    num_tokens, _grid = TOKEN_LAYOUT[modality](enc)
    mem = _MemoryFeatures(n, num_tokens, enc.hidden_size, cfg.dtype, enc.proj_size)
    redo = np.ones(n, dtype=bool)
    with progress_bar(n, modality, False) as bar, torch.inference_mode(), torch_threads(enc, modality, cfg):
        if modality == "text":
            run_text(mem, enc, texts, redo, cfg, bar)
        else:
            run_image(mem, enc, files, redo, cfg, bar)
    return mem


def _as_modality_data(modality: str, mem: _MemoryFeatures, features: str, recorded: dict[str, Any], grid):
    """Encoded posts in memory -> stage two's :class:`~mmcache.fuse.data.ModalityData` (as
    ``fuse.data.load_modality`` builds it from a file): x (N, L, D) storage dtype, mask (N, L)."""
    import torch

    from mmcache.cache import EncoderSpec
    from mmcache.fuse.data import ModalityData

    if features == "tokens":
        x, mask = torch.from_numpy(mem.arrays["tokens"]), torch.from_numpy(mem.arrays["mask"])
    else:
        if features not in mem.arrays:
            raise BadInputError(f"the {modality} encoder gives no {features!r} features")
        x = torch.from_numpy(mem.arrays[features]).unsqueeze(1)  # (N, 1, D)
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    conf, prov = recorded.get("config") or {}, recorded.get("provenance") or {}
    return ModalityData(modality=modality, path=Path("<memory>"), x=x, mask=mask,
                        valid=torch.from_numpy(mem.valid.copy()), hidden_size=int(x.shape[-1]),
                        model=EncoderSpec.from_provenance(modality, prov, conf).model,
                        info={"grid": list(grid) if grid else None, "config": conf, "provenance": prov})


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence transformers' progress bars ("Loading weights") and warnings for a library call,
    restoring the caller's settings after; ``verbose=True`` leaves everything as it is."""
    if verbose:
        yield
        return
    import transformers.utils.logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


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


def _grid_of(modality: str, enc):  # the image encoder's patch grid, None for text
    return tuple(enc.grid) if modality == "image" and getattr(enc, "grid", None) else None


def _has_pil(posts: list[Post]) -> bool:
    return any(p.image is not None and not isinstance(p.image, (str, Path)) for p in posts)


@contextmanager
def _no_folder() -> Iterator[None]:
    yield None


def _image_files(posts: list[Post], folder: Path | None) -> list[str | None]:
    """Each post's image as a file stage one can read (None: none, or its image already failed)."""
    files: list[str | None] = []
    for i, p in enumerate(posts):
        if p.image is None or "image" in p.problem:
            files.append(None)
        elif isinstance(p.image, (str, Path)):
            files.append(str(Path(p.image).expanduser().resolve()))
        elif hasattr(p.image, "save") and folder is not None:
            files.append(_save_image(p.image, folder, i))
        else:
            raise BadInputError(f"post {p.id}: image must be a path or a PIL image, got {type(p.image).__name__}")
    return files


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
        self._encoders: dict[str, tuple[Any, Any]] = {}  # verified once, reused by every call
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
                      batch_size: int = 32, num_workers: int | None = None, verbose: bool = False) -> PredictionResult:
        """Encode ``posts`` (in memory; into the cache ``cache_features/name/`` when given) and label
        them: one row per post, in order. Quiet (no transformers bars or warnings) unless ``verbose``."""
        with _quiet(verbose):
            encodable = [p for p in posts if "post" not in p.problem]
            probs = np.full((len(posts), len(self.classes)), np.nan, dtype=np.float32)
            notes = {p.id: p.problem["post"] for p in posts if "post" in p.problem}
            folder = None
            if encodable:
                if cache_features is not None:
                    folder = Path(cache_features) / name
                    data, answer, more = self._load_cached(encodable, Path(cache_features), name, batch_size, num_workers)
                else:
                    data, answer, more = self._encode_in_memory(encodable, name, batch_size, num_workers)
                got = self._apply_head(data, answer, len(encodable))
                pos = {p.id: i for i, p in enumerate(posts)}
                for p, row in zip(encodable, got, strict=True):
                    probs[pos[p.id]] = row
                notes.update(more)
        rows = self._rows(posts, probs, notes)
        return PredictionResult(classes=self.classes, rows=rows, probs=probs, metrics=self._metrics(rows, probs),
                                cache_dir=folder, scored=self._scored(rows))

    # -- internals
    def _encoder(self, modality: str, batch_size: int, workers: int):
        """The verified encoder of ``modality`` and its stage-one config (loaded on first use)."""
        if modality not in self._encoders:
            self._encoders[modality] = _load_verified_encoder(modality, self.recorded[modality], self.device)
        enc, cfg = self._encoders[modality]
        cfg.batch_size, cfg.num_workers, cfg.progress = batch_size, workers, False
        return enc, cfg

    def _encode_in_memory(self, posts: list[Post], name: str, batch_size: int, num_workers: int | None):
        """Stage one without a file: the posts through each verified encoder into arrays. A PIL image
        given in memory is the one thing written (a lossless PNG in a temporary folder, removed after),
        because stage one's image loop reads files in its worker processes."""
        import torch

        workers = num_workers if num_workers is not None else (0 if len(posts) < 64 else 2)
        texts = [p.text for p in posts]
        with tempfile.TemporaryDirectory(prefix="mmcache-predict-") if _has_pil(posts) else _no_folder() as tmp:
            files = _image_files(posts, Path(tmp) if tmp else None)
            mems = {}
            for m in ("image", "text"):  # image first: the DataLoader forks before the tokenizer's threads
                if m in self.uses:
                    enc, cfg = self._encoder(m, batch_size, workers)
                    mems[m] = (_encode_modality(m, enc, cfg, texts, files), _grid_of(m, enc))
        loaded = {m: _as_modality_data(m, mem, self.config.features, self.recorded[m], grid)
                  for m, (mem, grid) in mems.items()}
        reasons = {m: {posts[r].id: why for r, why in mem.reasons.items()} for m, (mem, _g) in mems.items()}
        labels = torch.as_tensor([self.classes.index(p.label) if p.label in self.classes else -1 for p in posts])
        return self._fusion_data(loaded, reasons, np.asarray([p.id for p in posts]), labels, posts, name, None, "")

    def _load_cached(self, posts: list[Post], cache_dir: Path, name: str, batch_size: int, num_workers: int | None):
        """Stage one into a normal cache ``cache_dir/name/`` (``cache_features``), read back as stage two does."""
        import torch

        from mmcache import cache as cf
        from mmcache.fuse.data import load_modality

        files = encode_posts(posts, self.recorded, self.classes, cache_dir, name, device=self.device,
                             batch_size=batch_size, num_workers=num_workers)
        index = cf.read_index(cache_dir / name / cf.INDEX_NAME)
        loaded = {m: load_modality(files[m], m, index, self.config.features, name) for m in self.uses}
        reasons = {m: _failure_reasons(files[m]) for m in self.uses}
        return self._fusion_data(loaded, reasons, index.ids, torch.from_numpy(index.labels), posts, name,
                                 cache_dir / name / cf.INDEX_NAME, index.fingerprint)

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

    def _fusion_data(self, loaded: dict[str, Any], reasons: dict[str, dict[str, str]], ids: np.ndarray, labels,
                     posts: list[Post], name: str, index_path: Path | None, fingerprint: str):
        """The encoded posts as stage-two data (a failed modality = an all-padding row), the rows the
        head can answer, and notes by post id."""
        from mmcache.fuse.data import FusionData

        valid = {m: md.valid.clone() for m, md in loaded.items()}
        for md in loaded.values():
            md.mask[~md.valid] = False  # a failed modality is an all-padding row: no real token
        data = FusionData(dataset=name, classes=self.classes, features=self.config.features,
                          modalities=self.uses, ids=ids, labels=labels, split_rows={}, text=loaded.get("text"),
                          image=loaded.get("image"), index_path=index_path, index_fingerprint=fingerprint)
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

    def _apply_head(self, data, answer: list[int], n: int) -> np.ndarray:
        """(n, C) probabilities in post order (NaN: no answer), through stage two's batched predict."""
        import torch

        from mmcache.fuse.engine import predict

        probs = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        if answer:
            rows = torch.as_tensor(answer, dtype=torch.long, device=data.device)
            out = predict(self.model, data, rows, self.config.eval_batch_size, self.config.amp)
            if self.temperature is not None:
                from mmcache.fuse.analyze import apply_temperature

                out = apply_temperature(out, self.temperature)
            probs[answer] = out
        return probs

    def explain(self, texts: Sequence[str] | None = None, images: Sequence[Any] | None = None, *,
                ids: Sequence[str] | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
        """Prediction plus attention for each post (attention heads only): ``text_share`` /
        ``image_share`` (see :mod:`mmcache.fuse.analyze`), ``tokens`` with ``text_weights``, and
        ``image_weights`` over the patch ``grid`` (row-major) for ``tokens`` features."""
        import torch

        from mmcache.fuse.analyze import attention_maps, explaining_heads

        if not self.model.explains:
            raise BadInputError(f"explain needs an attention head ({', '.join(explaining_heads())}); this run is "
                                f"{self.config.head!r}")
        posts = posts_from_lists(texts, images, ids)
        with _quiet(False):
            data, answer, notes = self._encode_in_memory(posts, "posts", batch_size, 0)
        out = self._rows(posts, self._apply_head(data, answer, len(posts)), notes)
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
