"""The training config: everything that determines a run's numbers (plus where it reads and writes).

:class:`TrainConfig` is the typed record every stage-two command passes around (train-fusion, ablate,
evaluate, the stacked trainer, the API); a run folder stores it resolved as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.fuse.data import FEATURES, MODALITY_ORDER
from mmcache.fuse.heads import head_uses, list_heads
from mmcache.fuse.runs import CONFIG_FILE, RunFolder, check_run_name

from mmcache.errors import BadInputError

__all__ = ["TrainConfig", "load_run_config"]


@dataclass
class TrainConfig:
    """Everything that determines a run's numbers (plus where it reads and writes).

    ``modalities``: the modalities whose features are loaded and required (a sample missing one is
    dropped); None = the head's own. An ablation sets both so every head sees the same samples.
    ``text_cache`` / ``image_cache``: feature files (None = the only one of that modality in
    ``cache_dir/<dataset>/``). ``patience`` 0 and ``grad_clip`` 0 switch those off. ``threads``: CPU
    threads for the run (1 is often fastest for small heads on a busy machine, and float results can
    depend on it, so it is part of the config; None on a CPU =
    :func:`~mmcache.common.small_model_threads`, recorded in provenance.json).

    ``max_memory``: bytes the run's feature arrays may take in memory (None:
    :func:`fuse.stream.default_budget`, half of MemAvailable); over it they are streamed from the cache files
    (:mod:`fuse.stream`) in an order drawn from ``stream_seed`` -- not the member seed, so every member of a
    stack is served by the same pass. A streamed run with a shuffle buffer as large as its train split equals
    the in-memory run whose ``seed`` is ``stream_seed`` bit for bit; with a smaller buffer the order (block
    shuffle), so the numbers, differ. In memory, ``stream_seed`` is unused.

    ``shuffle_buffer``: rows of that shuffle window (None / 0: auto, the largest power of two the budget
    allows; more than it allows is a :class:`BadInputError`). ``streamed``: None = auto (streamed when the
    features exceed the budget), True / False = streamed / in memory whatever the budget. Both are written
    RESOLVED into config.json (:func:`fuse.data.choose_streaming`), so the order a run was trained in --
    which free memory chose when they were auto -- is part of its config: a rerun of the stored config gives
    the same numbers on any machine that can hold the window, and an ablation's key tells runs apart by it.
    """

    head: str = "basic"
    dataset: str | None = None
    features: str = "cls"
    dim: int = 256
    layers: int = 1
    heads: int = 4
    dropout: float = 0.1
    head_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    class_balanced: bool = False
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int | None = None
    max_memory: int | None = None  # bytes; config files may say "4G"
    stream_seed: int = 0
    shuffle_buffer: int | None = None  # rows of the streamed shuffle window; None / 0 = auto from the budget
    streamed: bool | None = None  # None = auto (over the budget); resolved in config.json
    modalities: list[str] | None = None
    target: str | None = None  # a target or task of the dataset's index (None = its default); resolved in config.json
    text_cache: str | None = None
    image_cache: str | None = None
    cache_dir: str = "cache"
    runs_dir: str = "runs"
    run_name: str | None = None

    # -- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a JSON-like dict; unknown keys or wrong types raise :class:`BadInputError`."""
        if not isinstance(d, dict):
            raise BadInputError(f"a training config must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise BadInputError(f"unknown training config key(s): {', '.join(unknown)}; known: {', '.join(fields)}")
        defaults = cls()
        kw = {k: _coerce(k, v, getattr(defaults, k)) for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise BadInputError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                "expected a JSON training config") from None
        except (OSError, json.JSONDecodeError) as e:
            raise BadInputError(f"cannot read config file {path}: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`BadInputError` for a value no run can use."""
        if self.head not in list_heads():
            raise BadInputError(f"unknown fusion head {self.head!r}; known heads: {', '.join(list_heads())}")
        if self.features not in FEATURES:
            raise BadInputError(f"unknown features {self.features!r}; expected one of {', '.join(FEATURES)}")
        checks = [("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1),
                  ("eval_batch_size", self.eval_batch_size >= 1), ("lr", self.lr > 0),
                  ("weight_decay", self.weight_decay >= 0), ("warmup_frac", 0 <= self.warmup_frac < 1),
                  ("grad_clip", self.grad_clip >= 0), ("label_smoothing", 0 <= self.label_smoothing < 1),
                  ("patience", self.patience >= 0), ("threads", self.threads is None or self.threads >= 1),
                  ("max_memory", self.max_memory is None or self.max_memory >= 1 << 20),
                  ("shuffle_buffer", self.shuffle_buffer is None or self.shuffle_buffer >= 0)]
        for name, ok in checks:
            if not ok:
                raise BadInputError(f"invalid {name}: {getattr(self, name)!r}")
        if self.run_name is not None:
            check_run_name(self.run_name)
        if self.modalities is not None:
            bad = set(self.modalities) - set(MODALITY_ORDER)
            if bad or not self.modalities:
                raise BadInputError(f"modalities must be a non-empty subset of text, image; got {self.modalities}")
            missing = head_uses(self.head) - set(self.modalities)
            if missing:
                raise BadInputError(f"head {self.head!r} needs {', '.join(sorted(missing))}, not in modalities "
                                    f"{self.modalities}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check one config value's type against the field default (JSON has no int/float distinction)."""
    if value is None:
        if key in ("dataset", "modalities", "text_cache", "image_cache", "run_name", "threads", "target",
                   "max_memory", "shuffle_buffer", "streamed"):
            return None
        raise BadInputError(f"config key {key!r} may not be null")
    ok = True
    if key == "max_memory":
        from mmcache.fuse.stream import parse_size

        return parse_size(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else \
            _wrong_type(key, value)
    if isinstance(default, bool) or key == "streamed":
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    elif key == "modalities":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif key in ("threads", "shuffle_buffer"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str) or default is None:
        ok = isinstance(value, str)
    if not ok:
        _wrong_type(key, value)
    return value


def _wrong_type(key: str, value: Any):
    raise BadInputError(f"config key {key!r}: wrong type {type(value).__name__} ({value!r})")


def load_run_config(run_dir: str | Path | RunFolder) -> TrainConfig:
    """The resolved config a run saved (``config.json``, read through :class:`~mmcache.fuse.runs.RunFolder`);
    :class:`BadInputError` naming the file when it is not a valid config."""
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    try:
        return TrainConfig.from_dict(folder.config_dict())
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{folder.path / CONFIG_FILE}: not a valid run config ({e})") from None

