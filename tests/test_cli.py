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


def test_worker_and_bad_sample_errors_are_one_line(monkeypatch, capsys):
    import sys

    from torch._utils import ExceptionWrapper

    from leanvl import cli
    from leanvl.data.datasets import TooManyBadSamples

    def from_worker(error):  # what a DataLoader raises in the main process
        try:
            raise error
        except type(error):
            wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
        try:
            wrapper.reraise()
        except Exception as reraised:
            return reraised

    error = ValueError("clip 3: two lines\nof detail")
    error.add_note("a note")
    assert cli._error_line(from_worker(error)) == "clip 3: two lines\nof detail\na note"
    assert cli._error_line(ValueError("plain")) == "plain"

    def fail(args):
        raise TooManyBadSamples("train.jsonl: 20 corrupt samples in a row")

    monkeypatch.setattr(cli, "cmd_info", fail)
    assert main(["info"]) == 2
    assert capsys.readouterr().err.strip() == \
        "leanvl: error: train.jsonl: 20 corrupt samples in a row"


def test_eval_probe_trains_a_linear_probe_on_frozen_features(tmp_path, capsys):
    """`leanvl eval probe`: E-ViLM's linear probe of a frozen backbone from the command line."""
    import json

    from leanvl.data.annotations import write_annotations
    from leanvl.data.video import write_video
    from tests.conftest import ramp_frames

    records = []
    for i in range(8):  # two classes of clips that differ in brightness
        write_video(tmp_path / f"c{i}.mp4", ramp_frames(offset=0 if i % 2 else 90), fps=8)
        records.append({"video": f"c{i}.mp4", "label": "dark" if i % 2 else "bright"})
    train = write_annotations(records[:6], tmp_path / "train.jsonl")
    test = write_annotations(records[6:], tmp_path / "test.jsonl")
    common = ["model.name=umt_tiny", "model.kwargs={stage: 1}", f"data.root={tmp_path}",
              "data.num_frames=2", "data.size=32", "data.num_workers=0", "eval.probe_epochs=30",
              "data.cpu_threads=1"]  # keep the suite on one thread (conftest)
    assert main(["eval", "probe", "--quiet", f"data.test={test}", *common]) == 2
    assert "data.train" in capsys.readouterr().err
    assert main(["eval", "probe", "--quiet", f"data.train={train}", f"data.test={test}",
                 *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["num_train"], result["num_test"]) == (6, 2)
    assert result["train_top1"] == 100.0 and result["top1"] == 100.0
    # a missing test clip read by a loader worker: still one line naming the file and record
    broken = write_annotations(records[6:] + [{"video": "gone.mp4", "label": "dark"}],
                               tmp_path / "broken.jsonl")
    assert main(["eval", "probe", "--quiet", f"data.train={train}", f"data.test={broken}",
                 *common, "data.num_workers=1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("leanvl: error: ") and "Traceback" not in error
    assert "gone.mp4: file not found (record 2 of" in error and "broken.jsonl" in error


def test_a_command_leaves_the_process_group_it_ran_in(tmp_path, monkeypatch, capsys):
    # torchrun runs `-m leanvl ...` once per rank; a finished command destroys the group
    import torch.distributed as dist

    from leanvl.engine import distributed

    monkeypatch.setattr(distributed, "GLOO_DRAIN_SECONDS", 0.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert main(["info"]) == 0
        assert not dist.is_initialized()
        # and one that fails leaves it too, without waiting for the other ranks
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0,
                                world_size=1)
        monkeypatch.setattr(distributed, "barrier", lambda: pytest.fail("waited for the ranks"))
        assert main(["eval", "mc", "--model", str(tmp_path / "missing")]) == 2
        assert "leanvl: error:" in capsys.readouterr().err
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_eval_reads_with_the_settings_the_model_was_trained_with(tmp_path, monkeypatch, capsys):
    """Released weights record their input settings; `leanvl eval` takes them unless the
    config or the command line sets them, and says so on stderr."""
    import torch

    from leanvl.config import load_config
    from leanvl.engine.checkpoint import trained_input_settings
    from leanvl.models.registry import create_model
    from leanvl.tasks import finetune
    from leanvl.tasks.build import release

    trained = load_config(None, ["data.num_frames=2", "data.size=32", "data.max_text_len=64",
                                 "data.normalization=custom", "data.mean=[0.5,0.5,0.5]"])
    model = create_model("umt_tiny", stage=1)
    release(model, tmp_path / "model", trained.data)
    expected = {"num_frames": 2, "size": 32, "max_text_len": 64, "tokenizer": "bert-base-uncased",
                "normalization": "custom", "mean": [0.5, 0.5, 0.5],
                "std": list(trained.data.std)}
    assert trained_input_settings(tmp_path / "model") == expected
    assert trained_input_settings(tmp_path / "model" / "model.safetensors") == expected
    torch.save({"config": {"data": {**expected, "batch_size": 3}}}, tmp_path / "last.pt")
    assert trained_input_settings(tmp_path / "last.pt") == expected  # a training checkpoint
    clip = {**expected, "normalization": "clip"}  # mean and std are read only when custom
    torch.save({"config": {"data": clip}}, tmp_path / "clip.pt")
    assert trained_input_settings(tmp_path / "clip.pt") == {
        k: v for k, v in clip.items() if k not in ("mean", "std")}
    release(model, tmp_path / "bare")  # no data config: nothing recorded (as converted weights)
    assert trained_input_settings(tmp_path / "bare") == {}

    seen = []
    monkeypatch.setattr(finetune, "run_eval", lambda cfg, task, progress: seen.append(cfg) or {})
    assert main(["eval", "mc", "--model", str(tmp_path / "model"), "data.test=t.jsonl"]) == 0
    data = seen[-1].data
    assert (data.num_frames, data.size, data.max_text_len, data.normalization) == \
        (2, 32, 64, "custom") and list(data.mean) == [0.5, 0.5, 0.5]
    assert data.test == "t.jsonl" and data.batch_size == 8  # the rest: defaults and overrides
    note = capsys.readouterr().err
    assert "as trained: num_frames=2, size=32, max_text_len=64" in note
    assert "set by the config" not in note
    # a preset or an override wins, and the note names what differs from training
    assert main(["eval", "mc", "--model", str(tmp_path / "model"), "--config",
                 "demo_umt_stage2", "data.num_frames=8"]) == 0
    data = seen[-1].data
    assert (data.num_frames, data.size, data.max_text_len, data.normalization) == \
        (8, 96, 64, "custom")
    note = capsys.readouterr().err
    assert "num_frames=8 (trained: 2)" in note and "size=96 (trained: 32)" in note
    assert main(["eval", "mc", "--quiet", "--model", str(tmp_path / "bare")]) == 0
    assert (seen[-1].data.num_frames, seen[-1].data.size) == (4, 224)  # defaults
    assert capsys.readouterr().err == ""
