"""The posts ``predict`` takes: :class:`Post` records from parallel lists, a ``folder``-format manifest
(.csv / .jsonl, labels optional) or a dataset reader's split, every input row kept (a row the reader
would drop keeps its reason, so every input row gets an output row)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.errors import BadInputError

log = logging.getLogger(__name__)

__all__ = ["Post", "dataset_posts", "posts_from_lists", "read_manifest"]


@dataclass
class Post:
    """One image+text post to predict. ``image``: a path, a PIL image, or None. ``problem``: reasons
    found before encoding (unsafe path, duplicate id), by modality or ``"post"``."""

    id: str
    text: str
    image: Any = None
    label: str | None = None
    problem: dict[str, str] = field(default_factory=dict)



def read_manifest(path: str | Path) -> list[Post]:
    """A ``folder``-format manifest (``id,text,image[,label]``, .csv or .jsonl) as posts, one per row:
    rows the folder reader would drop (duplicate id, image path leaving the manifest's folder) are kept
    with their reason, so every row gets an output row. Labels are optional."""
    from mmcache.extract.datasets.folder import find_manifest
    from mmcache.extract.textio import clean_text, safe_child

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"--manifest {path}: no such file")
    manifest = find_manifest(path)
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise BadInputError(f"{manifest}: manifest must be .csv or .jsonl")
    rows = _jsonl_rows(manifest) if suffix == ".jsonl" else _csv_rows(manifest)
    if not rows:
        raise BadInputError(f"{manifest}: manifest is empty")
    posts, seen = [], set()
    for n, row in enumerate(rows, 1):
        if isinstance(row, str):  # a JSONL line that is not a JSON object: its row says why
            posts.append(Post(id=f"row{n}", text="", problem={"post": row}))
            seen.add(f"row{n}")
            continue
        sid = str(row.get("id") or "").strip() or f"row{n}"
        post = Post(id=sid, text=clean_text(str(row.get("text") or "")),
                    label=str(row.get("label") or "").strip() or None)
        if sid in seen:
            post.id = f"{sid}#row{n}"
            post.problem["post"] = f"duplicate id {sid!r} (row {n})"
        seen.add(post.id)
        rel = str(row.get("image") or "").strip()
        if rel:
            post.image = safe_child(manifest.parent, rel)
            if post.image is None:
                post.problem["image"] = f"image path {rel!r} leaves the manifest's folder"
        posts.append(post)
    return posts


def _csv_rows(manifest: Path) -> list[dict | str]:
    """CSV rows as dicts (column names stripped, lower-cased); a row whose cell count differs from the
    header's becomes its reason. The header must name ``id``, ``text`` and ``image`` (``label`` optional:
    predict needs no labels)."""
    from mmcache.extract.textio import csv_table, decode_bytes

    text, _enc = decode_bytes(manifest.read_bytes())
    table = csv_table(text, ("id", "text", "image"))
    if table is None:
        first = next((ln for ln in text.split("\n") if ln.strip()), "")
        raise BadInputError(f"{manifest}: the header must name the columns id, text, image[, label] "
                            f"(separator ',', ';' or tab); found {first.strip()[:100]!r}")
    header = [h.lower() for h in table[0]]
    return [dict(zip(header, cells, strict=True)) if len(cells) == len(header) else
            f"line {n}: malformed row ({len(cells)} cells for {len(header)} columns)" for n, cells in table[1]]


def _jsonl_rows(manifest: Path) -> list[dict | str]:
    """JSONL rows as dicts; a line that is not a JSON object becomes its reason (a string), so it still
    gets an output row (the folder reader refuses the whole file instead)."""
    from mmcache.extract.textio import decode_bytes, jsonl_records

    return [row if isinstance(row, dict) else f"line {n} is {row}"
            for n, row in jsonl_records(decode_bytes(manifest.read_bytes())[0])]


def dataset_posts(dataset: str, data_dir: str | Path | None, split: str | None, *, options: dict | None = None,
                  run_index: Path | None = None, split_file: str | Path | None = None, seed: int = 0,
                  run_split: dict[str, Any] | None = None, target: str | None = None,
                  require_run_split: bool = False) -> list[Post]:
    """The posts of a dataset reader, restricted to ``split`` (None or "all": every post). Splits come
    from the run's ``split.json`` (``run_split``: the exact ids it trained, validated and tested on), else
    its sample index when that knows the posts, else the stratified split (``seed`` / ``split_file``)
    as extraction makes it. ``require_run_split``: the run's ids must be found in the reader's posts
    (the door's split check, :func:`mmcache.fuse.scoring.split_for_posts`), never a silent fallback."""
    from mmcache import cache as cf
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.splits import resolve_splits

    idx = cf.read_index(run_index) if run_index is not None and Path(run_index).is_file() else None
    if idx is not None and not options and idx.attrs.get("reader") == dataset:
        options = idx.attrs.get("reader_options") or {}  # read the data as the run's cache did (e.g. demo n)
        options = json.loads(options) if isinstance(options, str) else options
    result = load_dataset(dataset, data_dir, **(options or {}))
    assignment = None
    ids = (run_split or {}).get("ids") or {}
    from_run = {sid: name for name, members in ids.items() for sid in members}
    if from_run and split_file is None and any(s.id in from_run for s in result.samples):
        assignment = from_run
    elif from_run and require_run_split:
        raise BadInputError(f"{dataset}: none of the run's split ids are among the posts read from {data_dir}; these "
                            "are not the posts the run was trained and tested on")
    elif idx is not None:
        known = dict(zip(idx.ids.tolist(), idx.splits.tolist(), strict=True))
        if all(s.id in known for s in result.samples):
            assignment = known
    if assignment is None:
        assignment = resolve_splits(result.samples, split_file=split_file, seed=seed).assignment
    keep = [s for s in result.samples if split in (None, "all") or assignment.get(s.id) == split]
    if not keep:
        raise BadInputError(f"{dataset}: no posts in split {split!r}")
    if require_run_split and from_run and split not in (None, "all"):
        lost = sorted(set(ids.get(split, [])) - {s.id for s in keep})
        if lost:
            raise BadInputError(f"{dataset}: {len(lost)} of the run's {split} posts are not in the data read now "
                                f"(e.g. {', '.join(lost[:3])}); the run's {split} split cannot be predicted as trained")
    labels = _target_labels(idx, target, keep)
    return [Post(id=s.id, text=s.text or "", image=s.image_path, label=labels.get(s.id, s.label_name)) for s in keep]


def _target_labels(idx, target: str | None, samples) -> dict[str, str | None]:
    """For a run trained on a target other than the dataset's default label: each post's label of that
    target, from the run's cache index (None where the index lacks the post or masks its label)."""
    if idx is None or not target or not idx.targets:
        return {}
    from mmcache.fuse.targets import available_targets

    targets, _tasks, default = available_targets(idx)
    if target == default or target not in targets:
        return {}
    row = {sid: r for r, sid in enumerate(idx.ids.tolist())}
    codes, classes = idx.targets[target], targets[target]
    return {s.id: (classes[int(codes[row[s.id]])] if s.id in row and int(codes[row[s.id]]) >= 0 else None)
            for s in samples}


def posts_from_lists(texts: Sequence[str] | None, images: Sequence[Any] | None, ids: Sequence[str] | None = None,
                     labels: Sequence[str] | None = None) -> list[Post]:
    """Posts from parallel lists (either of ``texts`` / ``images`` may be None: that modality missing)."""
    if isinstance(texts, str) or isinstance(images, (str, Path)):
        raise BadInputError("texts and images must be lists (one entry per post)")
    n = len(texts) if texts is not None else len(images) if images is not None else 0
    if n == 0:
        raise BadInputError("no posts: give texts=[...] and/or images=[...]")
    for name, seq in (("texts", texts), ("images", images), ("ids", ids), ("labels", labels)):
        if seq is not None and len(seq) != n:
            raise BadInputError(f"{name} has {len(seq)} entries for {n} posts")
    ids = [str(i) for i in ids] if ids is not None else [f"post{i}" for i in range(n)]
    if len(set(ids)) != n:
        raise BadInputError("ids must be unique")
    from mmcache.extract.textio import clean_text

    return [Post(id=ids[i], text="" if texts is None or texts[i] is None else clean_text(str(texts[i])),
                 image=None if images is None else images[i], label=None if labels is None else labels[i])
            for i in range(n)]


