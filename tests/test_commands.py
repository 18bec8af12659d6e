"""Every command the README and docs show, run end to end through ``leanvl.cli.main`` on a tiny
synthetic benchmark (32 px, 2 frames, a few clips) that the tests of this file share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from leanvl.cli import main

# a UMT-tiny with a one-layer text side: the model every command here trains and evaluates
TINY_RUN = """\
model:
  name: umt_tiny
  kwargs: {stage: 2, mask_type: random, text: {text_layers: 1, fusion_layers: 1}}
data: {num_frames: 2, size: 32, max_text_len: 32, batch_size: 4, num_workers: 0,
       cpu_threads: 1}
train: {epochs: 1, precision: fp32, log_every: 1}
eval: {batch_size: 8, rerank_k: 2, probe_epochs: 5}
"""
SYNTH = ["pretrain_clips=8", "retrieval_test_clips=4", "mc_test_clips=4",
         "classify_train_clips=6", "classify_test_clips=4", "size=32", "frames=8", "workers=1"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """`leanvl data synth` output (tiny) and the run config every command here uses."""
    root = tmp_path_factory.mktemp("commands")
    assert main(["data", "synth", "--quiet", "--out", str(root / "synth"), *SYNTH]) == 0
    (root / "tiny.yaml").write_text(TINY_RUN)
    return root / "synth", str(root / "tiny.yaml")


@pytest.fixture(scope="session")
def pretrained(bench, tmp_path_factory):
    """`leanvl pretrain` of the tiny model: its released folder and what it printed."""
    synth, config = bench
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", config, f"out={out}", f"data.root={synth}",
                 f"data.train={synth / 'pretrain.jsonl'}"]) == 0
    return out / "model"


def test_data_synth_writes_the_sizes_asked_for(bench):
    synth, _ = bench
    assert len(_lines(synth / "pretrain.jsonl")) == 8
    assert len(_lines(synth / "retrieval_test.jsonl")) == 4
    assert len(_lines(synth / "mc_test.jsonl")) == 4
    assert len(_lines(synth / "classify_train.jsonl")) == 6
    assert all((synth / r["video"]).is_file() for r in _lines(synth / "pretrain.jsonl"))


def test_pretrain_releases_weights_with_their_input_settings(pretrained):
    config = json.loads((pretrained / "config.json").read_text())
    assert config["name"] == "umt_tiny" and config["kwargs"]["stage"] == 2
    assert config["extra"]["data"]["num_frames"] == 2 and config["extra"]["data"]["size"] == 32


@pytest.mark.parametrize("task", ["retrieval", "qa", "mc", "probe"])
def test_eval_each_task_from_released_weights(task, bench, pretrained, capsys):
    synth, _ = bench
    test = {"retrieval": "retrieval_test", "qa": "qa_test", "mc": "mc_test",
            "probe": "classify_test"}[task]
    extra = [f"data.train={synth / 'classify_train.jsonl'}"] if task == "probe" else []
    assert main(["eval", task, "--quiet", "--model", str(pretrained), "--config", bench[1],
                 f"data.root={synth}", f"data.test={synth / (test + '.jsonl')}", *extra]) == 0
    metrics = _json_out(capsys)
    records = _lines(synth / f"{test}.jsonl")
    if task == "retrieval":
        captions = sum(len(r["caption"]) if isinstance(r["caption"], list) else 1
                       for r in records)
        assert (metrics["num_videos"], metrics["num_texts"]) == (len(records), captions)
        # every text has one right video among 4: R@5 covers them all, R@1 cannot exceed it
        assert metrics["dual/t2v/R@5"] == 100.0
    elif task in ("mc", "qa"):
        assert metrics["num_items"] == len(records)
    else:
        assert (metrics["num_train"], metrics["num_test"]) == (6, len(records))
    assert all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("task", ["retrieval", "qa", "mc", "classify"])
def test_finetune_each_task_and_its_release_evaluates_the_same(task, bench, tmp_path, capsys):
    """`leanvl finetune TASK` trains, evaluates and releases; `leanvl eval TASK --model` on the
    release gives the metrics the run measured on its last step (the head loads back)."""
    synth, config = bench
    train, test = {"retrieval": ("pretrain", "retrieval_test"), "mc": ("pretrain", "mc_test"),
                   "qa": ("qa_train", "qa_test"),
                   "classify": ("classify_train", "classify_test")}[task]
    data = [f"data.root={synth}", f"data.test={synth / (test + '.jsonl')}"]
    assert main(["finetune", task, config, f"out={tmp_path}", *data,
                 f"data.train={synth / (train + '.jsonl')}"]) == 0
    result = _json_out(capsys)
    released = tmp_path / "model"
    extra = json.loads((released / "config.json").read_text())["extra"]
    # retrieval and mc release a pre-training-shaped model (no task head)
    assert extra.get("task", "retrieval") == ("retrieval" if task == "mc" else task)
    assert main(["eval", task, "--quiet", "--model", str(released), "--config", config,
                 *data]) == 0
    again = _json_out(capsys)
    during = result["eval"]
    for key, value in again.items():
        if not key.startswith("seconds") and isinstance(value, (int, float)) and key in during:
            assert value == pytest.approx(during[key], abs=1e-6), key


def test_profile_counts_the_parameters_of_the_model(capsys):
    from leanvl.models.registry import create_model

    assert main(["profile", "umt_tiny", "--frames", "2", "--size", "32", "--repeats", "1",
                 "--no-latency", "stage=1"]) == 0
    table = capsys.readouterr().out
    model = create_model("umt_tiny", stage=1)
    encoder = sum(p.numel() for p in model.video_encoder.parameters())
    assert f"{encoder / 1e6:.2f}M" in table, table


def test_data_shard_packs_every_record(bench, tmp_path, capsys):
    from leanvl.data.shards import ShardDataset, shard_urls

    synth, _ = bench
    anno = synth / "pretrain.jsonl"
    assert main(["data", "shard", str(anno), "--root", str(synth), "--out",
                 str(tmp_path / "shards"), "--max-count", "3", "--quiet"]) == 0
    assert "wrote 8 samples in 3 shards" in capsys.readouterr().out
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert index["samples"] == 8 and len(shard_urls(str(tmp_path / "shards"))) == 3
    dataset = ShardDataset(str(tmp_path / "shards"), num_frames=2, size=32, train=False)
    captions = sorted(s["caption"] for s in dataset)
    assert captions == sorted(r["caption"][0] for r in _lines(anno))


def test_data_convert_from_the_command_line(tmp_path, capsys):
    fixtures = Path(__file__).parent / "fixtures" / "convert"
    out = tmp_path / "msrvtt_test.jsonl"
    assert main(["data", "convert", "msrvtt", "--test-csv",
                 str(fixtures / "MSRVTT_JSFUSION_test.csv"), "--out", str(out)]) == 0
    summary = _json_out(capsys)
    rows = (fixtures / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[1:]
    assert len(_lines(out)) == len([r for r in rows if r.strip()])
    assert summary


PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "src" / "leanvl" /
                                  "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_builds_its_model_on_the_meta_device(preset):
    from leanvl.config import load_config, to_object
    from leanvl.models.registry import create_model

    cfg = load_config(preset)
    to_object(cfg)  # every field is a known one of its type
    kwargs = dict(cfg.model.kwargs)
    if kwargs.get("freeze_pretrained") and not kwargs.get("init"):
        kwargs["freeze_pretrained"] = False  # init: the user's ViT weights file
    # transformers reads a pretrained text model or table (MiniLM, the demos') into real memory
    device = "cpu" if kwargs.get("text_pretrained") or kwargs.get("text_embed_init") else "meta"
    with torch.device(device):
        model = create_model(cfg.model.name, **kwargs)
    tensors = list(model.parameters())
    assert tensors and all(t.device.type == device for t in tensors), preset


# -- messages ----------------------------------------------------------------------------------

class _MeanModel(torch.nn.Module):
    """A one-parameter model whose loss reads the clips (the trainer needs something to fit)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def pretrain_losses(self, batch):
        return {"mean": (self.scale * batch["video"].mean()) ** 2}


def test_too_many_bad_samples_counts_every_one_over_the_loader_workers(tmp_path):
    """40 clips, one empty, one missing, one truncated, read by two loader workers: the run
    stops, and its error counts all three (not only those in the batches trained so far)."""
    from leanvl.config import load_config
    from leanvl.data.annotations import write_annotations
    from leanvl.data.datasets import Collator, TooManyBadSamples, VideoTextDataset, make_loader
    from leanvl.data.video import write_video
    from leanvl.engine.trainer import Trainer
    from tests.conftest import ramp_frames

    records = []
    for i in range(39):
        write_video(tmp_path / f"c{i}.mp4", ramp_frames(num_frames=4, offset=i), fps=8)
        records.append({"video": f"c{i}.mp4", "caption": f"clip {i}"})
    (tmp_path / "c5.mp4").write_bytes(b"")
    whole = (tmp_path / "c30.mp4").read_bytes()
    (tmp_path / "c30.mp4").write_bytes(whole[: len(whole) // 2])
    records.append({"video": "gone.mp4", "caption": "missing"})
    anno = write_annotations(records, tmp_path / "train.jsonl")
    dataset = VideoTextDataset(anno, tmp_path, num_frames=2, size=32, train=True)
    loader = make_loader(dataset, 4, Collator(None), train=True, num_workers=2)
    cfg = load_config(None, [f"out={tmp_path / 'run'}", "data.max_bad_fraction=0.01",
                             "train.epochs=1", "train.precision=fp32"])
    trainer = Trainer(cfg, _MeanModel(), loader, device="cpu", progress=False)
    with pytest.raises(TooManyBadSamples) as error:
        trainer.fit()
    message = str(error.value)
    assert message.startswith("3 corrupt samples out of 40"), message


def test_loading_released_weights_prints_no_load_report_or_fresh_head_note(tmp_path, capfd,
                                                                          caplog):
    """A MiniLM-based model: building it for training says once that its MLM head starts
    fresh (MiniLM has none) and prints no transformers table; loading its released weights,
    which hold the head, says neither."""
    import logging

    from leanvl.config import load_config
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import build_model, release

    cfg = load_config("demo_umt_stage2", ["model.kwargs.uta_layers=0", "data.size=32"])
    with caplog.at_level(logging.INFO):
        model = build_model(cfg.model)
    fresh = [r.getMessage() for r in caplog.records if "starts fresh" in r.getMessage()]
    assert len(fresh) == 1 and "text_encoder.mlm_head" in fresh[0]
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err
    assert "Loading weights" not in printed.out + printed.err
    release(model, tmp_path / "model", cfg.data)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        loaded = load_pretrained(tmp_path / "model")
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err and printed.out == ""
    assert not [r for r in caplog.records if "starts fresh" in r.getMessage()
                or r.levelno >= logging.INFO and "mlm" in r.getMessage().lower()]
    assert torch.equal(loaded.text_encoder.mlm_head.transform.dense.weight,
                       model.text_encoder.mlm_head.transform.dense.weight)


# -- leanvl convert ----------------------------------------------------------------------------

# official B/16 sizes -> the tiny ones (ViT 192 wide, 4 blocks; CLIP-tiny's 128-d output)
_TINY = {768: 192, 2304: 576, 3072: 768, 512: 128}


def _tiny_official(name: str, keep_blocks: int = 4, keep_heads: int = 2) -> dict:
    """Random tensors with the official names of a reference key list, at the tiny sizes."""
    import ast
    import re

    generator = torch.Generator().manual_seed(0)
    state = {}
    reference = Path(__file__).parent / "fixtures" / "reference" / name
    for line in reference.read_text().splitlines():
        key, shape = line.split("\t")
        block = re.search(r"(?:blocks|resblocks)\.(\d+)\.", key)
        head = re.match(r"clip_decoder\.(\d+)\.", key)
        if (block and int(block.group(1)) >= keep_blocks) or \
                (head and int(head.group(1)) >= keep_heads):
            continue
        size = tuple(_TINY.get(d, d) for d in ast.literal_eval(shape))
        state[key] = torch.randn(size, generator=generator)
    return state


def _convert_official(kind: str, keys: str, source: Path, out: Path, capsys) -> dict:
    """Tiny random weights with the official names of ``keys``, saved as the authors ship them
    (under "model" in a .pth) at ``source`` and converted by ``leanvl convert KIND`` into
    ``out``, every tensor written; returns the official state."""
    official = _tiny_official(keys)
    torch.save({"model": official} if source.suffix == ".pth" else official, source)
    assert main(["convert", kind, str(source), str(out), "--allow-pickle"]) == 0
    assert _json_out(capsys)["tensors"] == len(official)
    return official


def test_convert_umt_stage1_gives_weights_a_umt_model_starts_from(tmp_path, capsys):
    from leanvl.config import ModelConfig
    from leanvl.tasks.build import build_model

    out = tmp_path / "stage1.safetensors"
    official = _convert_official("umt-stage1", "umt_pretrain_b16_keys.txt",
                                 tmp_path / "umt_stage1.pth", out, capsys)
    model = build_model(ModelConfig(name="umt_tiny", pretrained=str(out),
                                    kwargs={"stage": 1, "teacher": "tiny"}))
    assert torch.equal(model.video_encoder.blocks[3].attn.qkv.weight,
                       official["encoder.blocks.3.attn.qkv.weight"])
    assert torch.equal(model.uta_heads[1].head.weight, official["clip_decoder.1.head.weight"])


def test_convert_umt_finetune_gives_a_classifier_state(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "k400.safetensors"
    official = _convert_official("umt-finetune", "umt_finetune_b16_keys.txt",
                                 tmp_path / "k400.pth", out, capsys)
    state = load_file(str(out))
    assert torch.equal(state["model.video_encoder.blocks.2.mlp.fc2.weight"],
                       official["blocks.2.mlp.fc2.weight"])
    assert torch.equal(state["head.head.weight"], official["head.weight"])
    assert torch.equal(state["head.fc_norm.bias"], official["fc_norm.bias"])


def test_convert_clip_visual_gives_a_teacher_file(tmp_path, capsys):
    from leanvl.models.teachers import CLIPVisionTeacher

    out = tmp_path / "clip_tiny.safetensors"
    official = _convert_official("clip-visual", "openai_clip_vit_b16_visual_keys.txt",
                                 tmp_path / "ViT-tiny.pt", out, capsys)
    teacher = CLIPVisionTeacher.from_file(str(out), return_layers=2)
    assert teacher.out_dim == 128
    state = teacher.state_dict()
    expected = official["transformer.resblocks.1.mlp.c_fc.weight"]
    assert any(v.shape == expected.shape and torch.equal(v, expected) for v in state.values())


# -- leanvl demo -------------------------------------------------------------------------------

def test_demo_quick_runs_every_stage_through_its_report(tmp_path, capsys):
    """`leanvl demo --quick` on a smaller-still benchmark with one short epoch per stage:
    teacher, stage 1, stage 2, zero-shot evaluation, results table and report."""
    from omegaconf import OmegaConf

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out), *SYNTH, "train.epochs=1",
                 "data.batch_size=4", "data.num_workers=0", "data.cpu_threads=1",
                 "eval.batch_size=8"]) == 0
    printed = capsys.readouterr().out
    assert "text-to-video R@1" in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    synth = out / "synth"
    assert results["results"]["retrieval"]["num_videos"] == \
        len(_lines(synth / "retrieval_test.jsonl")) == 4
    assert results["results"]["mc"]["num_items"] == len(_lines(synth / "mc_test.jsonl"))
    for stage in ("teacher", "stage1", "stage2"):  # one short epoch each: 2 steps of 4 clips
        assert (out / stage / "model" / "model.safetensors").is_file()
        saved = OmegaConf.load(out / stage / "stage_config.yaml")
        assert saved.train.epochs == 1 and saved.data.batch_size == 4
    assert (out / "report").is_dir() and any((out / "report").iterdir())
