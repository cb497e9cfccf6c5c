"""Config files for ``extract``, ``train-fusion`` and ``ablate``: YAML or JSON (by extension) in, a
plain dict out; and the resolved config of a call written back in the same form, so that feeding that
file to ``--config`` repeats the call.

Only the reading and writing live here (clear :class:`BadInputError` for a missing file, bad YAML /
JSON, a top level that is not a mapping, unknown keys); which keys a command knows and how command-line
flags override the file is the command's business (:mod:`mmcache.cli.stage_one`,
:mod:`mmcache.cli.stage_two`). PyYAML is imported only for ``.yaml`` / ``.yml`` files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmcache.errors import BadInputError

__all__ = ["YAML_SUFFIXES", "JSON_SUFFIXES", "check_keys", "plain", "read_config", "write_config"]

YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return "YAML"
    if suffix in JSON_SUFFIXES:
        return "JSON"
    raise BadInputError(f"config file {path}: unknown extension {suffix or '(none)'!r}; "
                        f"use .yaml, .yml or .json")


def _parse(text: str, kind: str) -> Any:
    if kind == "JSON":
        return json.loads(text)
    import yaml  # a transformers dependency; declared in pyproject.toml

    return yaml.safe_load(text)


def read_config(path: str | Path, *, known: Iterable[str] | None = None, what: str = "config") -> dict[str, Any]:
    """The mapping at the top of a YAML (``.yaml`` / ``.yml``) or JSON (``.json``) file; an empty YAML
    file is ``{}``. ``known``: the keys allowed at the top level (others: :class:`BadInputError`
    listing the known ones). ``what`` names the config in messages (``"extract config"``)."""
    path = Path(path)
    kind = _kind(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise BadInputError(f"config file {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise BadInputError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            f"expected a {kind} {what}") from None
    except OSError as e:
        raise BadInputError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = _parse(text, kind)
    except Exception as e:  # noqa: BLE001 -- json.JSONDecodeError or yaml.YAMLError: both are bad input
        detail = " ".join(str(e).split())
        raise BadInputError(f"cannot read config file {path} as {kind}: {detail}") from None
    if data is None and kind == "YAML":  # an empty (or comments-only) YAML file
        data = {}
    if not isinstance(data, dict):
        raise BadInputError(f"config file {path}: the top level must be a mapping of keys to values, "
                            f"got {type(data).__name__}")
    if known is not None:
        check_keys(data, known, f"{what} file {path}")
    return data


def check_keys(data: dict[str, Any], known: Iterable[str], where: str) -> None:
    """:class:`BadInputError` naming the keys of ``data`` not in ``known``, and the known ones."""
    known = list(known)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise BadInputError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(known)}")


def plain(value: Any) -> Any:
    """``value`` as YAML / JSON can hold it: paths as strings, tuples as lists, recursively."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def write_config(path: str | Path, data: dict[str, Any], *, header: str | None = None) -> Path:
    """Write ``data`` as YAML or JSON (by ``path``'s extension), atomically (temp file + rename: a
    concurrent reader sees the old file or the new one). ``header``: a comment line on top (YAML only)."""
    path = Path(path)
    kind = _kind(path)
    data = plain(data)
    if kind == "JSON":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = (f"# {header}\n" if header else "") + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------- extract
#: What an extract config holds beyond :class:`~mmcache.extract.config.ExtractConfig` fields: how the
#: call runs (torchrun merging), not what it computes.
EXTRACT_RUN_KEYS = ("keep_shards", "dist_backend", "dist_timeout_hours")
EXTRACT_CONFIG_NAME = "extract-config.yaml"


def extract_keys() -> list[str]:
    """The keys an extract config may hold: ExtractConfig fields (``command`` is the call's own
    command line, never read back), ``num_shards`` (with ``shard: i``) and :data:`EXTRACT_RUN_KEYS`."""
    import dataclasses

    from mmcache.extract.config import ExtractConfig

    names = [f.name for f in dataclasses.fields(ExtractConfig) if f.name != "command"]
    return [*names, "num_shards", *EXTRACT_RUN_KEYS]


def read_extract(path: str | Path) -> dict[str, Any]:
    """An extract config file as a dict of known keys."""
    return read_config(path, known=extract_keys(), what="extract config")


def _extract_defaults() -> dict[str, Any]:
    import dataclasses

    from mmcache.extract.config import ExtractConfig

    out = {}
    for f in dataclasses.fields(ExtractConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def resolve_extract(values: dict[str, Any], file: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The settings of one ``extract`` call: the command's ``values`` (its defaults where not given),
    replaced by the config ``file``'s, replaced by the ``flags`` the user gave. Dataset ``options``
    merge key by key (a flag's ``-o K=V`` replaces only K). Every ExtractConfig field is present
    (``command`` left out); ``shard`` is ``"i/n"``."""
    from mmcache.extract.config import parse_shard

    merged = {**_extract_defaults(), **values, **file, **flags}
    merged.pop("command", None)
    merged["options"] = {**(file.get("options") or {}), **(flags.get("options") or {})}
    if not merged.get("dataset"):
        raise BadInputError("--dataset is required (or a --config file with a `dataset` key)")
    shard, num_shards = merged.pop("shard", None), merged.pop("num_shards", None)
    if isinstance(shard, (list, tuple)):
        if len(shard) != 2:
            raise BadInputError(f"shard must be i/n or [i, n], got {shard!r}")
        shard = f"{shard[0]}/{shard[1]}"
    i, n = parse_shard(None if shard is None else str(shard), num_shards)
    merged["shard"] = f"{i}/{n}"
    return merged


def save_extract_config(index_path: str | Path, resolved: dict[str, Any]) -> Path:
    """Write ``resolved`` (:func:`resolve_extract`) as ``extract-config.yaml`` next to the sample index:
    ``extract --config`` that file repeats the call."""
    return write_config(Path(index_path).parent / EXTRACT_CONFIG_NAME, resolved,
                        header="resolved settings of the last `extract` into this folder; "
                               "`extract --config <this file>` repeats it")


# ------------------------------------------------------------------------------------------ training

def _train_fields() -> list[str]:
    import dataclasses

    from mmcache.fuse.config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_training(path: str | Path) -> dict[str, Any]:
    """A training config file (TrainConfig fields, e.g. a run's config.json) as a checked dict."""
    from mmcache.fuse.config import TrainConfig

    return TrainConfig.from_dict(read_config(path, known=_train_fields(), what="training config")).to_dict()


# ------------------------------------------------------------------------------------------- ablation
ABLATION_CONFIG_NAME = "ablation_config.yaml"
_BASE_KEYS = ("base", "training")  # the TrainConfig every run starts from; "training" is an alias


def _ablation_defaults() -> dict[str, Any]:
    import dataclasses

    from mmcache.fuse.ablate import AblationConfig

    out = {}
    for f in dataclasses.fields(AblationConfig):
        if f.name == "base":
            continue
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def read_ablation(path: str | Path) -> dict[str, Any]:
    """An ablation config file: AblationConfig fields plus ``base:`` (or ``training:``), a mapping of
    TrainConfig fields. A file of TrainConfig fields with a ``head`` (a run's config.json, as ``ablate
    --config`` took before ablation configs existed) is read as the ``base``."""
    data = read_config(path, what="ablation config")
    train_fields = _train_fields()
    if "head" in data and all(k in train_fields for k in data):
        return {"base": read_training(path)}
    check_keys(data, [*_ablation_defaults(), *_BASE_KEYS], f"ablation config file {path}")
    if all(k in data for k in _BASE_KEYS):
        raise BadInputError(f"ablation config file {path}: give base: or training:, not both")
    base = data.pop("training", data.pop("base", None)) or {}
    if not isinstance(base, dict):
        raise BadInputError(f"ablation config file {path}: base: must be a mapping of training config keys, "
                            f"got {type(base).__name__}")
    from mmcache.fuse.config import TrainConfig

    check_keys(base, train_fields, f"base: of ablation config file {path}")
    return {**data, "base": TrainConfig.from_dict(base).to_dict()}


def _names(value: Any, key: str) -> list[str] | None:
    """A list of names from a list or an ``a,b`` string (as the command line's repeatable options)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadInputError(f"ablation config key {key!r}: expected a list or a,b, got {value!r}")
    out = [p.strip() for v in items for p in str(v).split(",") if p.strip()]
    return out or None


def _numbers(value: Any, kind: type, key: str) -> list | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        return [kind(v) for v in items if str(v).strip()] or None
    except (TypeError, ValueError):
        raise BadInputError(f"ablation config key {key!r}: expected {kind.__name__} values, got {value!r}") from None


def resolve_ablation(values: dict[str, Any], file: dict[str, Any], flags: dict[str, Any],
                     training: dict[str, Any]) -> dict[str, Any]:
    """The settings of one ``ablate`` call: AblationConfig fields from the command's ``values`` (its
    defaults where not given), replaced by the config ``file``'s, replaced by the ``flags`` the user
    gave; ``base`` from the file's ``base:`` with the ``training`` flags (epochs, lr, ...) on top."""
    from mmcache.fuse.ablate import DEFAULT_FEATURES
    from mmcache.fuse.config import TrainConfig

    merged = {**_ablation_defaults(), **values, **{k: v for k, v in file.items() if k != "base"}, **flags}
    for key in ("datasets", "heads", "features", "targets"):
        merged[key] = _names(merged[key], key)
    merged["features"] = merged["features"] or list(DEFAULT_FEATURES)
    for key, kind in (("lrs", float), ("dims", int), ("dropouts", float)):
        merged[key] = _numbers(merged[key], kind, key)
    if isinstance(merged["shard"], (list, tuple)):
        merged["shard"] = "/".join(str(v) for v in merged["shard"])
    merged["base"] = TrainConfig.from_dict({**(file.get("base") or {}), **training}).to_dict()
    return merged


def ablation_results_dir(resolved: dict[str, Any]) -> Path:
    """Where the tables of a resolved ablation go (``results_dir``, else the runs folder's default)."""
    from mmcache.fuse.ablate import default_results_dir

    return Path(resolved["results_dir"] or default_results_dir(resolved["runs_dir"]))


def save_ablation_config(resolved: dict[str, Any]) -> Path:
    """Write ``resolved`` (:func:`resolve_ablation`) as ``ablation_config.yaml`` in the results folder."""
    return write_config(ablation_results_dir(resolved) / ABLATION_CONFIG_NAME, resolved,
                        header="resolved settings of this ablation; `ablate --config <this file>` repeats it")
