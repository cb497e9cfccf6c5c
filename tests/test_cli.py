"""The command line: `datasets`, `inspect`, and exit codes (0 ok, 2 bad input, 1 runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli as _run

from mmcache import cli

REPO = Path(__file__).resolve().parents[1]
NAMES = ("demo", "folder", "memotion", "mvsa_single", "mvsa_multiple")




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


# --------------------------------------------------------------------------------------------- one CLI

def _commands() -> list[list[str]]:
    from mmcache.cli.docs import command_paths

    return command_paths()


def test_version_prints_the_package_version(capsys):
    import mmcache

    code, out, err = _run(capsys, "--version")
    assert code == 0, err
    assert out.strip() == f"mmcache {mmcache.__version__}"


def test_dash_h_is_help_on_every_command(capsys):
    paths = _commands()
    assert ["cache", "verify"] in paths and ["train-fusion"] in paths
    for path in paths:
        code, out, err = _run(capsys, *path, "-h")
        assert code == 0, (path, err)
        assert "Usage:" in out and " ".join(path) in out, path


@pytest.mark.parametrize("argv, flag, valid", [
    (["train-fusion", "--features", "pooled"], "--features", "cls, mean, tokens, proj"),
    (["train-fusion", "--head", "transformer"], "--head", "dual_attention"),
    (["train-fusion", "--device", "gpu"], "--device", "auto, cpu, cuda, cuda:N"),
    (["ablate", "--heads", "basic,nope"], "--heads", "self_attention"),
    (["ablate", "--features", "cls", "--features", "tokens,pooled"], "--features", "tokens"),
    (["extract", "-d", "demo", "--precision", "int8"], "--precision", "fp32, bf16, fp16"),
    (["extract", "-d", "demo", "--modality", "audio"], "--modality", "text, image, both"),
    (["extract", "-d", "demo", "--dtype", "int8"], "--dtype", "float16, float32"),
    (["evaluate", "--run", "r", "--split", "dev"], "--split", "train, val, test"),
    (["predict", "--run", "r", "--split", "dev"], "--split", "test, all"),
    (["bench", "--precision", "fp8"], "--precision", "auto"),
])
def test_unknown_choice_is_a_usage_error_listing_the_values(capsys, argv, flag, valid):
    code, out, err = _run(capsys, *argv)
    assert code == 2, err
    _assert_one_line_error(err)
    assert flag in err and valid in err, err
    assert out == ""


def test_choices_accept_their_values_and_cuda_n():
    from mmcache.cli.options import Device, choice

    parse = choice(Device, also=r"cuda:\d+", also_shown="cuda:N")
    assert [parse(v) for v in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]


def test_choice_enums_match_the_library():
    from mmcache.extract.encoders import PRECISIONS
    from mmcache.extract.splits import SPLITS
    from mmcache.fuse.data import FEATURES

    from mmcache import cache as cf
    from mmcache.cli.options import Dtype, Features, Modality, Precision, Split

    assert [m.value for m in Features] == list(FEATURES)
    assert [m.value for m in Precision] == list(PRECISIONS)
    assert [m.value for m in Split] == list(SPLITS)
    assert [m.value for m in Dtype] == list(cf.DTYPES)
    assert [m.value for m in Modality] == [*cf.MODALITIES, "both"]


def test_a_plugin_head_is_a_valid_choice_and_shown_in_help(capsys):
    from mmcache.fuse import heads as fh

    @fh.register_head("plugin_probe")
    class PluginProbe(fh.TextOnlyHead):
        pass

    try:
        for command in ("train-fusion", "ablate"):
            code, out, _err = _run(capsys, command, "--help")
            assert code == 0 and "plugin_probe" in out, command
        from mmcache.cli.options import HeadsOpt

        parse = HeadsOpt.__metadata__[0].parser
        assert parse("basic,plugin_probe") == "basic,plugin_probe"
    finally:
        fh.unregister_head("plugin_probe")


def test_shared_options_are_declared_once():
    """Every command offering --cache-dir, --device, --seed, ... gets the same type and help, and
    --device shows the one default, auto."""
    import typer

    from mmcache.cli import app

    root = typer.main.get_command(app)
    seen: dict[str, set] = {}
    for path in _commands():
        cmd = root
        for word in path:
            cmd = cmd.get_command(typer.Context(root), word)
        ctx = typer.Context(cmd)
        for p in cmd.params:
            for opt in p.opts:
                seen.setdefault(opt, set()).add((p.display_type_rich(ctx), p.help, p.multiple))
        dev = next((p for p in cmd.params if "--device" in p.opts), None)
        if dev is not None:
            assert dev.show_default == "auto", path
    for flag in ("--cache-dir", "--device", "--seed", "--json", "--threads", "--epochs", "--runs-dir",
                 "--config", "--run", "--option", "--split-file", "--data-dir"):
        assert len(seen[flag]) == 1, (flag, seen[flag])
    assert "--heads" in seen and "--attention-heads" in seen


def test_train_fusion_heads_flag_is_attention_heads_now(capsys):
    code, _out, err = _run(capsys, "train-fusion", "--head", "basic", "--heads", "2")
    assert code == 2
    _assert_one_line_error(err)
    assert "--heads" in err


def test_log_file_that_cannot_be_opened_is_bad_input(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for bad in (tmp_path, a_file / "sub" / "x.log"):  # a directory; a file where a folder should be
        code, out, err = _run(capsys, "--log-file", str(bad), "datasets")
        assert code == 2, err
        _assert_one_line_error(err)
        assert "--log-file" in err and out == ""
    code, out, err = _run(capsys, "--log-file", str(tmp_path / "new" / "x.log"), "datasets")
    assert code == 0 and "demo" in out  # a missing folder for a new log file is created
    assert (tmp_path / "new" / "x.log").is_file()


def test_log_file_directory_in_a_real_process_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "--log-file", str(tmp_path), "datasets"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --log-file") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["ablate", "--help"], ["--help"], ["datasets"]])
def test_output_into_a_closed_pipe_exits_quietly(tmp_path, argv):
    # `cli.py ablate --help | head`: here the reader is gone before anything is written (rich's help
    # and click's echo meet the closed pipe in different places; both must end the same way)
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *argv], cwd=tmp_path,
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == ""


def test_cache_verify_cache_dir_alone_verifies_that_root(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()  # ./cache: empty, would say nothing is damaged
    bad = tmp_path / "other" / "demo" / "text--bert.h5"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an HDF5 file")
    code, out, _err = _run(capsys, "cache", "verify", "--cache-dir", "other", "--json")
    assert code == 1
    assert [e["path"] for e in json.loads(out)] == [str(Path("other") / "demo" / "text--bert.h5")]
    assert json.loads(out)[0]["status"] == "unreadable"
    code, out, _err = _run(capsys, "cache", "verify", "--cache-dir", "other", "-d", "demo", "--json")
    assert code == 1 and len(json.loads(out)) == 1
    code, _out, err = _run(capsys, "cache", "verify", "other", "-d", "demo")
    assert code == 2
    _assert_one_line_error(err)
