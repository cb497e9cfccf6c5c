"""The cache contract as its own package (``mmcache.cache``): complete, torch-free, and the only thing
stage two needs from stage one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mmcache.cache as cache

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmcache" / "cache"


def _py_files(*places: Path) -> list[Path]:
    """Every .py file of the given folders, and the given files themselves."""
    files = [p for d in places for p in ([d] if d.is_file() else d.rglob("*.py"))]
    assert files and all(p.is_file() for p in files), places
    return sorted(p for p in files if ".venv" not in p.parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement of ``path`` (``import a.b`` -> ("a.b", []))."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_every_name_in_all_resolves():
    missing = [n for n in cache.__all__ if not hasattr(cache, n)]
    assert not missing
    assert len(set(cache.__all__)) == len(cache.__all__)
    # the entry points both stages use, spot-checked against their home modules
    from mmcache.cache import index, lock, merge, reader

    assert cache.read_index is index.read_index and cache.FeatureFile is reader.FeatureFile
    assert cache.merge_shards is merge.merge_shards and cache.folder_lock is lock.folder_lock


def test_every_cf_attribute_stage_two_uses_is_exported():
    """Every ``cf.<name>`` the not-yet-switched modules read exists in the package, so switching their
    import line to ``from mmcache import cache as cf`` is all the integration needs."""
    used = set()
    for path in _py_files(REPO / "fuse", REPO / "mmcache"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cf":
                used.add(node.attr)
    assert used, "expected fuse/ or mmcache/ to use the cache contract"
    assert sorted(used - set(cache.__all__)) == []


def test_importing_the_package_loads_no_torch():
    code = ("import sys; import mmcache.cache, mmcache.tables; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith('mmcache.extract') or m.startswith('mmcache.fuse')); print(bad)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_no_private_name_is_imported_across_the_package():
    """Helpers two modules need are public in the module that owns them (e.g. ``nonfinite_rows``)."""
    bad = [(p.name, mod, n) for p in _py_files(PACKAGE) for mod, names in _imports(p)
           if mod.startswith("mmcache") for n in names if n.startswith("_")]
    assert bad == []


def test_the_package_never_imports_stage_one_or_torch():
    bad = [(p.name, mod) for p in _py_files(PACKAGE) for mod, _names in _imports(p)
           if mod.split(".")[0] in ("torch", "transformers") or mod.startswith(("mmcache.extract", "mmcache.fuse"))]
    assert bad == []


def test_stage_two_never_imports_stage_one_and_the_core_imports_neither_stage():
    """The project's rule: stage two (fuse/) reads only the cache contract (mmcache.cache) and the
    neutral core, never a stage-one module; the contract and the core modules below both stages
    (mmcache.cache, tables, errors, common, progress, csvsafe, locks, plugins) import neither stage.
    Only the facade (api, cli, predict, posts, demo) runs both."""
    core = [REPO / "mmcache" / "cache", *(REPO / "mmcache" / f"{m}.py" for m in
                                          ("tables", "errors", "common", "progress", "csvsafe", "locks", "plugins"))]
    bad = []
    for path in _py_files(REPO / "fuse"):
        bad += [(str(path.relative_to(REPO)), mod) for mod, names in _imports(path)
                if mod.startswith("mmcache.extract") or (mod == "mmcache" and "extract" in names)]
    for path in _py_files(*core):
        bad += [(str(path.relative_to(REPO)), mod) for mod, names in _imports(path)
                if mod.startswith(("mmcache.extract", "mmcache.fuse"))
                or (mod == "mmcache" and {"extract", "fuse"} & set(names))]
    assert bad == []
