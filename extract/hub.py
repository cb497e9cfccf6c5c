"""Finding a checkpoint: a local folder or a Hugging Face hub id (offline-aware, with a reachability
check), its config, and the source facts recorded in a feature file's provenance."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from mmcache.extract.adapters.base import one_line

from mmcache.errors import ModelLoadError

log = logging.getLogger(__name__)


def looks_like_path(model: str) -> bool:
    """True when ``model`` can only be meant as a local path (hub ids are 'name' or 'owner/name')."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep != "/" and os.sep in model
    )


_REACHABLE: dict[str, bool] = {}


def hub_offline() -> bool:
    import huggingface_hub.constants as hub

    flag = os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(hub.HF_HUB_OFFLINE) or flag


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or the hub's host cannot
    be connected to within ``timeout_s`` (checked once per process; behind a proxy assumed reachable).
    Loading a hub id then uses the local Hugging Face cache only, instead of ~40 s of retries."""
    if hub_offline():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout_s).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
            log.info("%s is unreachable: loading hub ids from the local cache only", host)
    return _REACHABLE[host]


def load_config(model: str, what: str, revision: str | None):
    """(AutoConfig, local_files_only) for ``model``; every way this can fail is one :class:`ModelLoadError`."""
    from transformers import AutoConfig

    hint = "Download it elsewhere and pass its folder path."
    local_dir = os.path.isdir(model)
    if local_dir:
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelLoadError(
                f"could not load {what} model {model!r}: the folder has no config.json "
                "(expected a folder written by save_pretrained)."
            )
    elif looks_like_path(model) or os.path.exists(model):
        raise ModelLoadError(
            f"could not load {what} model {model!r}: no such folder. "
            "Pass a Hugging Face hub id or the path of a folder written by save_pretrained."
        )
    local_only = local_dir or not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=False,
                                            local_files_only=local_only)
        return config, local_only
    except (OSError, ValueError, KeyError, ImportError) as e:
        reason = one_line(e)
        if local_dir:
            raise ModelLoadError(f"could not load {what} model {model!r}: {reason}") from e
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"could not load {what} model {model!r}: it needs custom code (trust_remote_code), "
                "which this tool never enables; pick a model with a built-in transformers architecture."
            ) from e
        if local_only:
            raise ModelLoadError(f"could not load {what} model {model!r}: not found locally; set --{what}-model "
                                 "to a folder or enable network") from e
        raise ModelLoadError(
            f"could not load {what} model {model!r}: not a local folder and not loadable from the "
            f"Hugging Face hub ({reason}). {hint}"
        ) from e


def source_info(model: str, config) -> dict:
    local = os.path.isdir(model)
    return {
        "model_id": model,
        "resolved_path": str(Path(model).resolve()) if local else None,
        "commit_hash": getattr(config, "_commit_hash", None),
        "name_or_path": getattr(config, "_name_or_path", None),
    }


def library_versions() -> dict:
    import transformers

    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


