"""Plugins (mmcache/plugins.py): a tiny third-party package "installed" in a temp folder (a package plus a
``.dist-info`` with ``entry_points.txt``, the folder put on ``PYTHONPATH``) adds a head, a dataset reader
and an encoder family through the ``mmcache.heads`` / ``mmcache.datasets`` / ``mmcache.encoders`` groups;
a broken plugin beside it is skipped with a warning naming it. Everything that loads plugins runs in a
subprocess, so the registries of this test process never see them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mmcache.fuse.synthetic import make_cache

REPO = Path(__file__).resolve().parents[1]

HEAD = '''
import torch
from torch import nn
from mmcache.fuse.heads import FusionHead, register_head


@register_head("plugin_gate")
class GatedHead(FusionHead):
    """Mean-pooled text and image mixed by a learned per-post gate: (B, D) -> (B, C)."""

    uses = frozenset({"text", "image"})

    def __init__(self, **args):
        super().__init__(**args)
        self.gate = nn.Linear(2 * args["dim"], 1)
        self.classifier = nn.Linear(args["dim"], args["num_classes"])

    def _forward(self, text, text_mask, image, image_mask):
        def pool(x, m):
            m = m.unsqueeze(-1)
            return torch.where(m, x, torch.zeros(())).sum(1) / m.sum(1).clamp(min=1)

        t, i = pool(text, text_mask), pool(image, image_mask)
        g = torch.sigmoid(self.gate(torch.cat([t, i], -1)))
        return self.classifier(g * t + (1 - g) * i), {}
'''

READER = '''
import csv
from mmcache.extract.datasets import SENTIMENT3, DatasetSpec, LoadReport, LoadResult, Sample, Target, register_dataset


def load_lines(root):
    report, samples = LoadReport(), []
    with open(root / "posts.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            report.rows_seen += 1
            if row["label"] not in SENTIMENT3:
                report.drop("unknown_label", row["id"])
                continue
            label = SENTIMENT3.index(row["label"])
            samples.append(Sample(row["id"], row["text"], None, label, row["label"]))
    return LoadResult("plugin_lines", root, SENTIMENT3, samples, report)


register_dataset(DatasetSpec(name="plugin_lines", description="text-only posts from a plugin",
                             layout="posts.csv (id,text,label)", loader=load_lines,
                             targets=(Target("sentiment", SENTIMENT3),)))
'''

ENCODER = '''
from mmcache.extract.adapters.base import ImageAdapter, register_encoder


@register_encoder
class PluginVision(ImageAdapter):
    name = "plugin-vision"
    model_types = ("plugin_vision",)
    pooling = {"cls": "class token", "mean": "patch mean", "tokens": "patches"}
'''

ENTRY_POINTS = """\
[mmcache.heads]
gate = mmcache_demo_plugin.heads

[mmcache.datasets]
lines = mmcache_demo_plugin.reader

[mmcache.encoders]
vision = mmcache_demo_plugin.encoder
"""


def _install(root: Path, broken: bool = True) -> Path:
    """Write the plugin distribution(s) into ``root`` (a folder to put on sys.path)."""
    pkg = root / "mmcache_demo_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, code in (("heads", HEAD), ("reader", READER), ("encoder", ENCODER)):
        (pkg / f"{name}.py").write_text(textwrap.dedent(code))
    dist = root / "mmcache_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmcache-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    if broken:  # a second distribution whose head module fails on import, and one naming a missing module
        (root / "mmcache_broken_plugin.py").write_text("raise RuntimeError('this plugin is broken')\n")
        bdist = root / "mmcache_broken_plugin-0.1.dist-info"
        bdist.mkdir()
        (bdist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmcache-broken-plugin\nVersion: 0.1\n")
        (bdist / "entry_points.txt").write_text(
            "[mmcache.heads]\nbroken = mmcache_broken_plugin\n[mmcache.datasets]\ngone = no_such_module_here\n")
    return root


def _env(plugins: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def _python(code: str, plugins: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=_env(plugins),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("site"))


def test_registries_include_plugins_and_skip_broken_ones(plugins, tmp_path):
    (tmp_path / "posts.csv").write_text("id,text,label\na,good,positive\nb,meh,neutral\nc,odd,ecstatic\n")
    proc = _python(f"""
        import json, logging
        logging.basicConfig(level=logging.WARNING)
        from mmcache.fuse.heads import list_heads, create_head
        from mmcache.extract.datasets import list_datasets, load_dataset
        from mmcache.extract.adapters import list_encoders
        from mmcache.plugins import loaded_plugins
        res = load_dataset("plugin_lines", {str(tmp_path)!r})
        head = create_head("plugin_gate", text_dim=4, image_dim=6, num_classes=3, dim=8)
        print(json.dumps({{"heads": list_heads(), "datasets": list_datasets(), "encoders": list_encoders("image"),
                          "loaded": loaded_plugins(), "ids": [s.id for s in res.samples],
                          "dropped": dict(res.report.dropped), "params": sum(p.numel() for p in head.parameters())}}))
    """, plugins)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert "plugin_gate" in got["heads"] and {"basic", "dual_attention"} <= set(got["heads"])
    assert "plugin_lines" in got["datasets"] and {"demo", "folder"} <= set(got["datasets"])
    assert "plugin-vision" in got["encoders"] and "dinov2" in got["encoders"]
    assert got["loaded"] == {"mmcache.heads": ["gate"], "mmcache.datasets": ["lines"], "mmcache.encoders": ["vision"]}
    assert got["ids"] == ["a", "b"] and got["dropped"] == {"unknown_label": 1} and got["params"] > 0
    # each broken entry point: one warning naming it and its distribution, no traceback
    assert "skipped plugin 'broken'" in proc.stderr and "mmcache-broken-plugin" in proc.stderr
    assert "this plugin is broken" in proc.stderr and "skipped plugin 'gone'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugin_head_trains_through_the_cli(plugins, tmp_path):
    make_cache(tmp_path / "cache", "synth", n=40)
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "train-fusion", "--head", "plugin_gate", "-d", "synth",
                           "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"), "--epochs", "2",
                           "--dim", "8", "--threads", "1", "--device", "cpu"],
                          cwd=tmp_path, env=_env(plugins), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    configs = list((tmp_path / "runs").rglob("config.json"))
    assert len(configs) == 1 and json.loads(configs[0].read_text())["head"] == "plugin_gate"
    assert (configs[0].parent / "metrics.json").is_file()
    assert "Traceback" not in proc.stderr


def test_registry_parametrized_head_tests_pick_up_a_plugin_head(plugins):
    """Adding a head is one module: tests/test_heads.py parametrizes over list_heads(), so the plugin head
    runs through every per-head test (forward/backward, padding, masks, determinism) with no edit."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           "tests/test_heads.py", "-k", "plugin_gate"],
                          cwd=REPO, env=_env(plugins), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert int(summary.split(" passed")[0].split()[-1]) >= 10, summary


def test_a_broken_plugin_does_not_stop_the_cli(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "mmcache_broken_plugin.py").write_text("import no_such_dependency\n")
    dist = root / "mmcache_broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmcache-broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmcache.heads]\nbroken = mmcache_broken_plugin\n")
    make_cache(tmp_path / "cache", "synth", n=30)
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "train-fusion", "--head", "basic", "-d", "synth",
                           "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1",
                           "--dim", "8", "--threads", "1", "--device", "cpu"],
                          cwd=tmp_path, env=_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped plugin 'broken'" in proc.stderr and "no_such_dependency" in proc.stderr
    assert "Traceback" not in proc.stderr
