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


# --------------------------------------------------------------------------------------------- issue 11

def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(argv, a word the one error line must contain): every command, usage and library errors."""
    empty = tmp_path / "empty_cache"
    empty.mkdir(exist_ok=True)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"head": "basic", "note": "caf\u00e9"}'.encode("latin-1"))
    not_json = tmp_path / "notjson.json"
    not_json.write_text("head: basic\n")
    unknown_head = tmp_path / "unknown_head.json"
    unknown_head.write_text('{"head": "transformer_xl"}')
    return [
        (["train-fusion", "--seed", "abc"], "--seed"),
        (["train-fusion", "--head", "basic", "--batch-size", "many"], "--batch-size"),
        (["ablate", "--batch-size", "many"], "--batch-size"),
        (["extract"], "--dataset"),
        (["evaluate"], "--run"),
        (["inspect", "-d", "demo", "--bogus"], "--bogus"),
        (["frobnicate"], "train-fusion"),  # lists the commands
        (["cache", "frobnicate"], "merge"),
        (["bench", "--samples", "lots"], "--samples"),
        (["demo", "--n", "x"], "--n"),
        (["train-fusion", "--head", "basic", "--dataset", "nope", "--cache-dir", str(empty)], "nope"),
        (["train-fusion", "--head", "basic", "--cache-dir", str(empty)], "extract"),
        (["ablate", "-d", "nope", "--cache-dir", str(empty)], "nope"),
        (["train-fusion", "--head", "basic", "--run-name", "../../x", "--cache-dir", str(empty)], "folder name"),
        (["train-fusion", "--config", str(latin1)], "UTF-8"),
        (["train-fusion", "--config", str(not_json)], "cannot read config"),
        (["ablate", "--config", str(unknown_head), "--cache-dir", str(empty)], "dual_attention"),  # lists heads
        (["ablate", "--config", str(latin1), "--cache-dir", str(empty)], "UTF-8"),
    ]


def test_every_bad_input_is_exit_2_and_one_error_line(capsys, tmp_path):
    for argv, word in _bad_inputs(tmp_path):
        code, out, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert "╭" not in err and "Usage:" not in err, (argv, err)
        _assert_one_line_error(err)
        assert word in err, (argv, err)
        assert out == "", (argv, out)


def test_bad_input_in_a_real_process_no_box_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "train-fusion", "--seed", "abc"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: Invalid value for '--seed'")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_no_arguments_and_group_alone_show_help(capsys):
    for argv in ([], ["cache"]):
        code, out, err = _run(capsys, *argv)
        assert code == 0 and "Usage" in out and "error" not in err


def test_run_name_cannot_leave_runs_dir(tmp_path):
    from mmcache.fuse.train import TrainConfig

    from mmcache.errors import BadInputError

    for name in ("../../x", "a/b", "..", "a\\b"):
        with pytest.raises(BadInputError, match="plain folder name"):
            TrainConfig(run_name=name).validate()
    TrainConfig(run_name="my-run.2").validate()


def test_resume_command_repeats_the_call(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py", "extract"])
    cmd = cli.resume_command(["extract", "-d", "demo", "--text-model", "my models/bert"])
    assert cmd.endswith("cli.py extract -d demo --text-model 'my models/bert'")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/mmcache"])
    assert cli.resume_command(["ablate", "-j", "2"]) == "mmcache ablate -j 2"
