"""What ``cache info`` and ``cache verify`` show: every cache file with shapes, dtypes, size,
provenance, completeness and failure count (:func:`collect`, :func:`format_info`), and every done row
checked against its checksum (:func:`verify`, :func:`format_verify`). h5py + numpy: fast, no torch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py

from mmcache.cache.encoder import EncoderSpec
from mmcache.cache.lock import CacheBusyError
from mmcache.cache.names import FAILURES_NAME, INDEX_NAME, list_feature_files, list_shard_files
from mmcache.cache.reader import FeatureFile, describe, repair_command
from mmcache.cache.virtual import virtual_info
from mmcache.errors import BadInputError, CacheError
from mmcache.tables import fit_line, fit_table, format_table, human_bytes, terminal_width

__all__ = ["collect", "format_info", "format_verify", "verify"]


def _dataset_dirs(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists() or any(path.glob("*--*.h5")):
        return [path]
    return sorted(d for d in path.iterdir() if d.is_dir() and ((d / INDEX_NAME).exists() or any(d.glob("*--*.h5"))))


def _describe(path: Path) -> dict[str, Any]:
    try:
        return describe(path)
    except CacheError as first:
        # A file another process is writing is locked; show its progress from an unlocked read.
        try:
            d = describe(path, locking=False, verify=False)
            d["in_use"] = True
            return d
        except (CacheError, OSError, KeyError):
            return {"path": str(path), "kind": "unreadable", "error": str(first),
                    "size_bytes": path.stat().st_size if path.exists() else 0}


def collect(path: str | Path = "cache") -> list[dict[str, Any]]:
    """One dict per cache file under ``path`` (a file, a dataset folder, or the cache root), index
    files first in each folder. Feature files get ``matches_index`` (fingerprints agree with the
    folder's index.h5; None when there is no index) and ``failures_csv`` (path or None)."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"no cache at {str(p)!r}")
    if p.is_file():
        files = [p]
    else:
        files = []
        for d in _dataset_dirs(p):
            if (d / INDEX_NAME).exists():
                files.append(d / INDEX_NAME)
            files += list_feature_files(d) + list_shard_files(d)
    entries = []
    index_fp: dict[Path, str | None] = {}
    for f in files:
        e = _describe(f)
        if e["kind"] == "index":
            index_fp[f.parent] = e["fingerprint"]
        elif e["kind"] == "features":
            if f.parent not in index_fp:
                idx = f.parent / INDEX_NAME
                index_fp[f.parent] = _describe(idx).get("fingerprint") if idx.exists() else None
            want = index_fp[f.parent]
            e["matches_index"] = None if want is None else want == e["index_fingerprint"]
            csv = f.parent / FAILURES_NAME
            e["failures_csv"] = str(csv) if csv.exists() else None
            e["virtual"] = _virtual(f)
        entries.append(e)
    return entries


def _virtual(path: Path) -> dict[str, Any] | None:
    """``merged_from`` of a virtual merge (see :mod:`mmcache.cache.virtual`), else None."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return virtual_info(f)
    except (OSError, ValueError, KeyError):
        return None


def _virtual_line(v: dict[str, Any]) -> str:
    shards = v["shards"]
    total = sum(int(s["bytes"]) for s in shards)
    names = ", ".join(s["file"] for s in shards[:2]) + (", ..." if len(shards) > 2 else "")
    return (f"  virtual over {v['num_shards']} shards ({names}; {human_bytes(total)}): it reads them in place, "
            "keep them next to it (`cache merge --copy` makes one self-contained file)")


def _virtual_note(e: dict) -> str:
    return f" (virtual, {e['virtual']['num_shards']} shards)" if e.get("virtual") else ""


def _state(e: dict) -> str:
    if e.get("in_use"):
        return "being written"
    if e.get("damaged_rows"):
        return f"DAMAGED ({e['damaged_rows']} rows; cache verify)"
    if not e["complete"]:
        return "INCOMPLETE"
    if e.get("matches_index") is False:
        return "STALE (index changed)"
    return "complete"


def format_info(entries: list[dict[str, Any]], width: int | None = None) -> str:
    """Tables: the index files, the feature files, then per feature file its arrays and provenance;
    everything fits in ``width`` columns (default: the terminal's)."""
    width = width or terminal_width()
    return "\n".join(fit_line(line, width) for line in _format_info(entries, width).split("\n"))


def _format_info(entries: list[dict[str, Any]], width: int) -> str:
    if not entries:
        return "no cache files found"
    out = []
    idx = [e for e in entries if e["kind"] == "index"]
    if idx:
        out.append(fit_table(["index", "dataset", "samples", "splits", "fingerprint", "size"], [
            [e["path"], e["dataset"], e["samples"], " ".join(f"{k}={v}" for k, v in e["splits"].items()),
             e["fingerprint"], human_bytes(e["size_bytes"])] for e in idx], width))
        for e in idx:
            resplits = f", re-split {len(e['split_history'])}x" if e.get("split_history") else ""
            out.append(f"  {e['dataset']} split: {e['split_source']} (fingerprint {e['split_fingerprint']}{resplits})")
    feats = [e for e in entries if e["kind"] == "features"]
    if feats:
        out += ["", fit_table(
            ["file", "modality", "model", "state", "samples", "done", "valid", "failed", "tokens", "dtype", "size"],
            [[e["path"], e["modality"], e.get("name") or e["model"], _state(e) + _virtual_note(e), e["samples"], e["done"], e["valid"], e["failed"],
              "x".join(map(str, e["arrays"]["tokens"]["shape"][1:])) if "tokens" in e["arrays"] else "-",
              e["dtype"], human_bytes(e["size_bytes"])]
             for e in feats], width)]
    for e in feats:
        prov, conf = e["provenance"], e["config"]
        out += ["", f"{e['path']}:"]
        for name, a in e["arrays"].items():
            out.append(f"  {name:<7} {tuple(a['shape'])} {a['dtype']}")
        out.append("  valid   (N,) bool   done (N,) bool   failure (N,) utf-8[160]   id (N,) str   row (N,) int64")
        if "fields" in e:
            status = e.get("fields_complete") or {}
            shown = ", ".join(k + ("" if status.get(k, True) else " (being added: incomplete)") for k in e["fields"])
            lean = "" if "tokens" in e["fields"] else "  (lean: `extract --fields` adds more)"
            out.append(f"  fields {shown}{lean}")
        spec = EncoderSpec.from_provenance(e["modality"], prov, conf)
        rev = spec.commit_hash or spec.resolved_path or "-"
        fam = f", family {spec.family}, layer {spec.layer or 'last'}" if spec.family else ""
        out.append(f"  model {spec.model} ({prov.get('class_name')}{fam}, revision/path {rev})")
        extra = f", grid {e['grid']}, patch_pool {conf.get('patch_pool')}" if e["modality"] == "image" else \
            f", max_length {conf.get('max_length')}"
        out.append(f"  hidden {e['hidden_size']}, tokens {e['num_tokens']}{extra}, dtype {e['dtype']}, "
                   f"precision {conf.get('precision')}")
        out.append(f"  transformers {prov.get('transformers_version')}, torch {prov.get('torch_version')}, "
                   f"h5py {prov.get('h5py_version')}; config {e.get('config_fingerprint')}, "
                   f"index {e['index_fingerprint']}")
        out.append(f"  created {e.get('created')}, updated {e.get('updated') or '-'}"
                   + (f", shard {e['shard'][0]}/{e['shard'][1]}" if e.get("shard") else ""))
        if e.get("virtual"):
            out.append(_virtual_line(e["virtual"]))
        if e["failed"]:
            out.append(f"  {e['failed']} failed samples" + (f" (see {e['failures_csv']})" if e.get("failures_csv") else ""))
    if feats:
        unverifiable = sum(1 for e in feats if e.get("checksums") is False)
        out += ["", "checked against their checksums here: cls, mean, mask, valid (those stored); `cache verify` checks the "
                "token arrays too" + (f". {unverifiable} file(s) have no checksums (older version)" if unverifiable
                                     else "")]
    bad = [e for e in entries if e["kind"] == "unreadable"]
    if bad:
        out += ["", fit_table(["unreadable file", "error"], [[e["path"], e["error"]] for e in bad], width)]
    return "\n".join(out).lstrip("\n")


# --------------------------------------------------------------------------------------------- verify

def _feature_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    return [f for d in _dataset_dirs(p) for f in list_feature_files(d) + list_shard_files(d)]


def verify(path: str | Path = "cache") -> list[dict[str, Any]]:
    """What ``cache verify`` does: every feature file under ``path`` (a file, a dataset folder or the
    cache root) read whole and every done row checked against its checksum and for NaN/Inf.

    One dict per file: ``status`` ok | damaged | unverifiable (no checksums: older version; NaN/Inf
    still checked) | unreadable | in_use; ``damaged`` [{row, id, fields}]; ``repair`` (the command)."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"no cache at {str(p)!r}")
    out = []
    for f in _feature_files(p):
        t0 = time.perf_counter()
        e: dict[str, Any] = {"path": str(f), "size_bytes": f.stat().st_size}
        try:
            with FeatureFile(f) as ff:
                damage = ff.verify()
                e["size_bytes"] = ff.nbytes_on_disk()  # a virtual merge: with the shards it reads
                e["done"], e["samples"] = int(ff.done.sum()), len(ff.done)
                e["repair"] = repair_command(f, ff.provenance, ff.modality) if damage else None
        except CacheBusyError as err:
            out.append({**e, "status": "in_use", "error": str(err)})
            continue
        except (CacheError, OSError, KeyError) as err:
            out.append({**e, "status": "unreadable", "error": str(err),
                        "repair": "python cli.py extract ... --repair (same options as the run that made it)"})
            continue
        fields: dict[int, list[str]] = {int(r): [] for r in damage.rows}
        for name, rows in damage.rows_by_field.items():
            for r in rows:
                fields[int(r)].append(name)
        e["damaged"] = [{"row": r, "id": str(damage.ids[r]), "fields": fs} for r, fs in fields.items()]
        e["status"] = "damaged" if damage else ("ok" if damage.verifiable else "unverifiable")
        e["seconds"] = round(time.perf_counter() - t0, 3)
        out.append(e)
    return out


def format_verify(entries: list[dict[str, Any]], limit: int = 20) -> str:
    """A table of files and states, then the damaged rows of each damaged file and its repair command."""
    if not entries:
        return "no feature files found"
    rows = [[e["path"], e["status"], len(e.get("damaged") or []), f"{e.get('done', '-')}/{e.get('samples', '-')}",
             human_bytes(e["size_bytes"]), e.get("seconds", "-")] for e in entries]
    out = [format_table(["file", "state", "damaged rows", "done/rows", "size", "seconds"], rows)]
    for e in entries:
        if e["status"] == "damaged":
            bad = e["damaged"]
            shown = ", ".join(f"{d['id']} (row {d['row']}: {'+'.join(d['fields'])})" for d in bad[:limit])
            out += ["", f"{e['path']}: {len(bad)} damaged rows: {shown}{' ...' if len(bad) > limit else ''}",
                    f"  repair: {e['repair']}  (or rerun the extract command that made it)"]
        elif e["status"] in ("unreadable", "in_use"):
            out += ["", f"{e['path']}: {e['error']}"]
    if any(e["status"] == "unverifiable" for e in entries):
        out += ["", "unverifiable: written before per-row checksums existed (only NaN/Inf checked); "
                "`extract --force` rebuilds such a file with them"]
    return "\n".join(out)
