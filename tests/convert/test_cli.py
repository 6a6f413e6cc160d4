"""The checkpoint subcommands: registration, help, and errors that name the bad input."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from megatron_hybrid.convert.cli import add_checkpoint_subcommands, main


def test_subcommands_register_on_a_parser():
    parser = argparse.ArgumentParser()
    add_checkpoint_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["merge", "--trainables", "run", "--out", "m", "--tp", "2", "--fft-only"]
    )
    assert (args.command, args.tp, args.pp, args.fft_only, args.base) == ("merge", 2, 1, True, None)
    args = parser.parse_args(["export-peft", "--trainables", "run", "--out", "a"])
    assert args.fft_mode == "modules_to_save" and callable(args.func)
    for name in ("convert-hf", "convert-to-hf"):
        with pytest.raises(SystemExit):
            parser.parse_args([name])  # required options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["export-peft", "--trainables", "{tmp}/nowhere", "--out", "{tmp}/a"],
            "nowhere does not exist",
        ),
        (
            ["merge", "--trainables", "{tmp}", "--out", "{tmp}/m"],
            "neither a checkpoint directory nor a run root",
        ),
        (["convert-to-hf", "--checkpoint", "{tmp}/nowhere", "--out", "{tmp}/h"], "does not exist"),
        (["convert-hf", "--hf", "{tmp}", "--out", "{tmp}/b"], "has no config.json"),
    ],
)
def test_bad_inputs_exit_2_and_name_the_input(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"megatron-hybrid {argv[0]}: error:")


def test_one_process_commands_refuse_torchrun(tmp_path, capsys, monkeypatch):
    """Several ranks would race on one output directory (each stages and renames it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    (run / "iter_0000001").mkdir(parents=True)
    argv = ["export-peft", "--trainables", str(run / "iter_0000001"), "--out", str(tmp_path / "a")]
    monkeypatch.setattr(
        "megatron_hybrid.convert.merge.read_trainables_meta",
        lambda path: (path, SimpleNamespace(base=None)),
    )
    assert main(argv) == 2
    assert "export-peft runs as one process" in capsys.readouterr().err


def test_an_out_that_is_the_current_directory_or_an_input_exits_2_untouched(
    tmp_path, capsys, monkeypatch
):
    """Before, ``convert-hf --out . --overwrite`` deleted the current directory's files, and an
    ``--out`` inside ``--hf`` (or ``merge --out <base>``) was replaced while being read."""
    from tests.convert.hf_models import make_hf_model

    hf = tmp_path / "hf"
    make_hf_model("llama", hf)
    files = sorted(p.name for p in hf.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out, message in (
        (".", "not the current directory"),
        ("../work", "not the current directory"),
        (str(hf / "sub"), f"overlaps the input --hf {hf}"),
        (str(tmp_path), "not the current directory"),
    ):
        assert main(["convert-hf", "--hf", str(hf), "--out", out, "--overwrite"]) == 2
        assert message in capsys.readouterr().err, out
    assert (work / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in hf.iterdir()) == files
