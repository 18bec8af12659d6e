import subprocess
import sys

import pytest

from leanvl.cli import build_parser, main


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "leanvl", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("info", "demo", "data"):
        assert command in result.stdout
    data_help = subprocess.run([sys.executable, "-m", "leanvl", "data", "--help"],
                               capture_output=True, text=True).stdout
    for command in ("synth", "check", "convert", "shard"):
        assert command in data_help


def test_convert_formats_are_all_commands():
    from leanvl.data.convert import CONVERTERS

    parser = build_parser()
    for name in CONVERTERS:
        args = parser.parse_args(["data", "convert", name, "--out", "x.json"])
        assert args.converter == name


def test_info_reports_versions_device_and_threads(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("leanvl", "torch", "av", "device", "torch threads", "offline tokenizer"):
        assert key in out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: annotation file not found" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "pretrain_clip=3"]) == 2
    assert "did you mean 'synth.pretrain_clips'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "frobnicate"])
