"""`make demo` end to end (small): tiny encoders built locally, extraction, the ablation grid, tables."""

import json

from mmcache.fuse.heads import list_heads

from mmcache import cli


def test_demo_end_to_end_small(tmp_path, capsys):
    args = ["demo", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--n", "60", "--seeds", "1", "--epochs", "2",
            "--jobs", "1", "--no-plots"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for head in list_heads():  # the demo grid runs every registered head
        assert head in out
    assert "failures:" not in out  # no pointer to a failures file that lists nothing
    table = json.loads((tmp_path / "results" / "ablation_demo.json").read_text())
    assert table  # written
    assert (tmp_path / "cache" / "demo" / "index.h5").is_file()
    # A second call reuses the cache and every run.
    assert cli.main(args) == 0
    out2 = capsys.readouterr().out
    assert "up to date" in out2
    assert "0 trained" in out2
