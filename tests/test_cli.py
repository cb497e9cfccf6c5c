"""The command line: `datasets`, `inspect`, and exit codes (0 ok, 2 bad input, 1 runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmcache import cli

REPO = Path(__file__).resolve().parents[1]
NAMES = ("demo", "folder", "memotion", "mvsa_single", "mvsa_multiple")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(err: str) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err


@pytest.fixture
def demo_dir(tmp_path) -> Path:
    return tmp_path / "demo"


def test_datasets_lists_names(capsys):
    code, out, err = _run(capsys, "datasets")
    assert code == 0, err
    listed = [ln for ln in out.splitlines() if ln and not ln.startswith(" ")]
    assert set(NAMES) <= set(listed)
    assert "layout:" in out
    assert "option n=600 (int)" in out
    assert "option strict_agree=False (bool)" in out


def test_inspect_demo_table(capsys, demo_dir):
    code, out, err = _run(capsys, "inspect", "--dataset", "demo", "--data-dir", str(demo_dir),
                          "--option", "n=50", "-o", "seed=1")
    assert code == 0, err
    assert "Traceback" not in err
    assert out.startswith("dataset demo at ")
    assert "50 samples" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("split ") and "total" in ln)
    assert header.split() == ["split", "positive", "neutral", "negative", "total"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()
            if ln.split() and ln.split()[0] in ("train", "val", "test", "all")}
    assert set(rows) == {"train", "val", "test", "all"}
    assert int(rows["all"][-1]) == 50
    assert sum(int(rows[s][-1]) for s in ("train", "val", "test")) == 50
    assert (demo_dir / "manifest.csv").is_file()


def test_inspect_demo_json(capsys, demo_dir):
    code, out, err = _run(capsys, "inspect", "-d", "demo", "--data-dir", str(demo_dir), "-o", "n=40",
                          "--seed", "3", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["dataset"] == "demo"
    assert s["samples"] == 40
    assert s["classes"] == ["positive", "neutral", "negative"]
    assert s["options"] == {"n": 40, "seed": 0}
    assert s["split_source"].startswith("stratified(seed=3")
    assert sum(s["class_counts"].values()) == 40
    assert set(s["split_counts"]) == {"train", "val", "test"}
    assert s["report"]["rows_seen"] == 40 and s["dropped_total"] == 0


def test_inspect_same_seed_same_output(capsys, demo_dir):
    args = ("inspect", "-d", "demo", "--data-dir", str(demo_dir), "-o", "n=30", "--json")
    first = _run(capsys, *args)
    second = _run(capsys, *args)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]


def test_inspect_with_split_file(capsys, demo_dir, tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("id,split\ndemo_0000,test\ndemo_0001,dev\nghost,train\n")
    code, out, err = _run(capsys, "inspect", "-d", "demo", "--data-dir", str(demo_dir), "-o", "n=10",
                          "--split-file", str(split), "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["split_file_unknown_ids"] == 1
    assert s["split_file_unassigned_ids"] == 8
    assert sum(s["split_counts"]["none"].values()) == 8
    code, out, err = _run(capsys, "inspect", "-d", "demo", "--data-dir", str(demo_dir), "-o", "n=10",
                          "--split-file", str(split))
    assert code == 0
    assert "1 ids not in the data, 8 samples not in the file" in out


@pytest.mark.parametrize("argv", [
    ["inspect", "--dataset", "nope"],
    ["inspect", "-d", "demo", "--option", "n=abc"],
    ["inspect", "-d", "demo", "--option", "colour=red"],
    ["inspect", "-d", "demo", "--option", "n"],
    ["inspect", "-d", "mvsa_single", "--option", "strict_agree=maybe"],
])
def test_bad_input_exit_2_one_line(capsys, tmp_path, argv):
    code, out, err = _run(capsys, *argv, "--data-dir", str(tmp_path / "data"))
    assert code == 2
    _assert_one_line_error(err)
    assert out == ""


def test_unknown_dataset_message_lists_names(capsys):
    code, _out, err = _run(capsys, "inspect", "--dataset", "nope")
    assert code == 2
    _assert_one_line_error(err)
    assert "nope" in err and all(n in err for n in NAMES)


def test_missing_data_folder_exit_2(capsys, tmp_path):
    code, _out, err = _run(capsys, "inspect", "-d", "mvsa_single", "--data-dir", str(tmp_path / "absent"))
    assert code == 2
    _assert_one_line_error(err)


def test_bad_split_file_exit_2(capsys, demo_dir, tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("id,split\ndemo_0000,holdout\n")
    for path in (split, tmp_path / "absent.csv"):
        code, _out, err = _run(capsys, "inspect", "-d", "demo", "--data-dir", str(demo_dir), "-o", "n=5",
                               "--split-file", str(path))
        assert code == 2
        _assert_one_line_error(err)


def test_missing_required_option_exit_2(capsys):
    code, _out, err = _run(capsys, "inspect")
    assert code == 2
    assert "Traceback" not in err
    assert "--dataset" in err


def test_unknown_command_exit_2(capsys):
    code, _out, err = _run(capsys, "frobnicate")
    assert code == 2
    assert "Traceback" not in err


def test_help_exit_0(capsys):
    code, out, _err = _run(capsys, "--help")
    assert code == 0
    assert "inspect" in out and "datasets" in out


def test_cli_help_subprocess_from_repo_root():
    proc = subprocess.run([sys.executable, "cli.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "inspect" in proc.stdout and "datasets" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_subprocess_from_elsewhere_bad_input(tmp_path):
    # `python /path/to/cli.py` from another folder works without install, and maps errors to exit 2
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "inspect", "-d", "nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: unknown dataset 'nope'")


def test_inspect_demo_n_zero_exit_2(capsys, demo_dir):
    code, _out, err = _run(capsys, "inspect", "-d", "demo", "--data-dir", str(demo_dir), "-o", "n=0")
    assert code == 2
    _assert_one_line_error(err)
