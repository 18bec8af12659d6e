"""The training engine: exact resumption, DDP equivalence, accumulation, atomic checkpoints,
optimizer groups and schedule, released weights, and the run-stopping checks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from leanvl.data.datasets import MixedLoader, TooManyBadSamples, make_loader
from leanvl.engine import checkpoint as ckpt
from leanvl.engine.optim import build_optimizer, build_scheduler, cosine_lr
from leanvl.engine.precision import autocast, full_precision, make_grad_scaler, resolve_precision
from leanvl.engine.resumable import ResumableBatches
from leanvl.engine.trainer import NonFiniteLossError, Trainer
from tests.engine_scripts.toy_setup import (
    ToyDataset,
    ToyModel,
    ToyTasks,
    collate,
    run_ddp_toy,
    run_toy_eval,
    toy_config,
)

SCRIPTS = Path(__file__).parent / "engine_scripts"


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


class CrashingModel(ToyModel):
    """Raises inside ``pretrain_losses`` on call ``crash_at`` (a machine dying mid-run)."""

    def __init__(self, crash_at: int, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def pretrain_losses(self, batch):
        if self.calls + 1 == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return super().pretrain_losses(batch)


def _evaluate(model: nn.Module) -> dict[str, float]:
    # draws from the global RNG on purpose: evaluating must not change the training run
    probe = torch.randn(8, 6)
    assert not model.training and not torch.is_grad_enabled()
    return {"mean_output": float(model(probe).mean())}


def _toy_run(out, overrides=(), model=None, batch_size=4, dataset=None, evaluate=None):
    cfg = toy_config(out, list(overrides))
    torch.manual_seed(0)
    model = model if model is not None else ToyModel()
    loader = make_loader(dataset or ToyDataset(), batch_size, collate, train=True, seed=cfg.seed)
    trainer = Trainer(cfg, model, loader, evaluate=evaluate, device="cpu", progress=False)
    return trainer, model


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # 24 samples / batch 4 = 6 steps per epoch, 18 in all; checkpoints every 4 steps and at
    # epoch ends; the crash happens during step 11, so the run resumes from step 8, which is
    # in the middle of epoch 1 (batch 2 of 6).
    overrides = ["train.save_every=4", "train.eval_every=1", "train.clip_grad=0.5"]
    trainer, model = _toy_run(tmp_path / "straight", overrides, evaluate=_evaluate)
    straight = trainer.fit()
    straight_params = _params(model)
    assert [h["step"] for h in straight["history"]] == list(range(1, 19))
    assert len(straight["eval_history"]) == 3  # after epochs 1 and 2, and at the end

    run = tmp_path / "crashed"
    torch.manual_seed(0)
    trainer, _ = _toy_run(run, overrides, model=CrashingModel(crash_at=11), evaluate=_evaluate)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    kept = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert kept == ["checkpoint-00000006.pt", "checkpoint-00000008.pt"]  # keep_checkpoints=2
    state = ckpt.load_checkpoint(run / "checkpoints" / kept[-1])
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (8, 1, 2)
    assert not any(k.startswith("teacher.") for k in state["model"])  # frozen: not stored

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    fresh = ToyModel()
    fresh.teacher.load_state_dict(model.teacher.state_dict())  # teachers come from their source
    trainer, _ = _toy_run(run, overrides + ["train.resume=auto"], model=fresh,
                          evaluate=_evaluate)
    resumed = trainer.fit()
    assert [h["step"] for h in resumed["history"]] == list(range(9, 19))
    for a, b in zip(straight["history"][8:], resumed["history"]):
        for key in ("loss", "regression", "distill", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    _assert_same_params(straight_params, _params(fresh), atol=1e-6)
    assert straight["eval"]["mean_output"] == pytest.approx(resumed["eval"]["mean_output"],
                                                            abs=1e-6)
    # metrics.jsonl: the records the crashed run wrote after step 8 were replaced, not doubled
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 19))
    assert (run / "config.yaml").is_file()


class LengthToy(ToyDataset):
    """A ToyDataset whose items have text lengths (for length-grouped batches)."""

    def text_lengths(self) -> list[float]:
        return [float(i % 5) for i in range(len(self))]


def test_resumable_batches_skip_matches_full_epoch():
    dataset = ToyDataset(n=12)
    images = ToyDataset(n=6, seed=1)
    video_loader = make_loader(dataset, 2, collate, train=True, seed=5)
    image_loader = make_loader(images, 2, collate, train=True, seed=7)
    # ratios ask for more image batches than one pass holds: the child loader wraps around
    mixed = MixedLoader({"video": video_loader, "image": image_loader},
                        ratios={"video": 1, "image": 1}, seed=2)
    # a worker process: DataLoader iterators call iter(sampler) twice while starting up
    worker_loader = make_loader(dataset, 2, collate, train=True, seed=5, num_workers=1)
    grouped = make_loader(LengthToy(n=12), 2, collate, train=True, seed=5, group_by_length=True)
    for loader in (video_loader, mixed, worker_loader, grouped):
        batches = ResumableBatches(loader, seed=0)
        for epoch in (0, 1):
            full = [(b.get("source"), b["index"].tolist()) for b in batches.epoch(epoch)]
            assert len(full) == len(loader)
            for skip in (1, 4, 5):
                tail = [(b.get("source"), b["index"].tolist())
                        for b in batches.epoch(epoch, skip=skip)]
                assert tail == full[skip:], (loader, epoch, skip)
        assert full != [(b.get("source"), b["index"].tolist()) for b in batches.epoch(0)]
        if loader is mixed:
            assert Counter(s for s, _ in full)["image"] > len(image_loader)


def _torchrun(script: str, out: Path) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 SCRIPTS/script out`` (gloo, one thread per process),
    started in the background; output captured."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["TMPDIR"] = str(out.parent)  # torchrun's log folders go with the test, not into /tmp
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(SCRIPTS / script), str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(launched: subprocess.Popen) -> None:
    try:
        output, _ = launched.communicate(timeout=240)
    finally:
        launched.kill()
    assert launched.returncode == 0, output[-4000:]


def test_ddp_two_processes_match_one_process(tmp_path):
    # per-process batch 4 x 2 ranks (gloo, launched by torchrun) vs batch 8 in one process
    launched = _torchrun("ddp_toy.py", tmp_path / "ddp")
    try:
        single = run_ddp_toy(tmp_path / "single")  # meanwhile, the one-process reference
    finally:
        _finish(launched)
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert len(ddp["losses"]) == len(single["losses"]) == 8
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert ddp["regression"] == pytest.approx(single["regression"], abs=1e-5)
    for name, value in single["params"].items():
        torch.testing.assert_close(torch.tensor(ddp["params"][name]), torch.tensor(value),
                                   atol=1e-5, rtol=0, msg=name)


def test_evaluation_split_over_two_ranks_equals_one_process(tmp_path):
    # retrieval: 7 clips and 13 captions of different lengths: uneven blocks, padded text gathered
    launched = _torchrun("ddp_eval.py", tmp_path / "ddp")
    try:
        single = run_toy_eval(tmp_path / "single")
    finally:
        _finish(launched)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["counts"] == {"videos": 7, "texts": 13, "pairs": 3 * (13 + 7)}
    # each rank did its block of the work, no more: rank 0 the smaller half of each split
    # (pairs: 39 text queries x top 3, then 21 video queries x top 3)
    assert [r["counts"] for r in ranks] == [{"videos": 3, "texts": 6, "pairs": 19 + 10},
                                            {"videos": 4, "texts": 7, "pairs": 20 + 11}]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["metrics"] == pytest.approx(single["metrics"], abs=1e-9)
        for name, scores in single["scores"].items():
            torch.testing.assert_close(torch.tensor(rank["scores"][name]),
                                       torch.tensor(scores), atol=1e-5, rtol=0, msg=name)
        assert rank["bf16"] == torch.arange(15.0).reshape(5, 3).tolist()
        assert rank["bool"] == (torch.arange(15).reshape(5, 3) > 7).tolist()
        # multiple choice (3 and 4 options), QA, classification by views, the linear probe
        for task, metrics in single["tasks"].items():
            theirs = rank["tasks"][task]
            assert theirs.keys() == metrics.keys(), task
            for key, value in metrics.items():
                if key == "scores":
                    for row, expected in zip(theirs[key], value, strict=True):
                        torch.testing.assert_close(torch.tensor(row), torch.tensor(expected))
                elif isinstance(value, float):
                    assert theirs[key] == pytest.approx(value, abs=1e-6), (task, key)
                else:  # counts, predicted options, answers and classes
                    assert theirs[key] == value, (task, key)
    mc, qa = single["tasks"]["mc"], single["tasks"]["qa"]
    assert mc["num_items"] == 7 and mc["num_items/even"] == 4
    assert [len(row) for row in mc["scores"]] == [3] * 6 + [4]
    assert qa["num_items"] == 7 and qa["num_out_of_vocabulary"] == 1
    assert len(qa["predictions"]) == 7 and set(qa["predictions"]) <= set(ToyTasks.ANSWERS)
    assert single["tasks"]["classify"]["num_items"] == 4  # 7 clips of 4 videos
    assert single["tasks"]["probe"]["num_train"] == 7
    assert single["tasks"]["mc_one_item"]["num_items"] == 1
    # MC 7 + QA 7 + classify 7 + probe 7 + 5 + MC 1 clips in one process; each rank encoded its
    # block, and both the one item
    assert single["task_videos"] == 34
    assert [r["task_videos"] for r in ranks] == [3 + 3 + 3 + 3 + 2 + 1, 4 + 4 + 4 + 4 + 3 + 1]


def test_gradient_accumulation_equals_large_batch(tmp_path):
    dataset = ToyDataset(n=32)
    results = []
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        torch.manual_seed(0)  # the same initial weights (the model is built before _toy_run seeds)
        trainer, model = _toy_run(tmp_path / name, ["train.epochs=2", f"train.grad_accum={accum}",
                                                    "train.clip_grad=1.0"],
                                  model=ToyModel(dropout=0.0), batch_size=batch, dataset=dataset)
        history = trainer.fit()["history"]
        results.append((history, _params(model)))
    (big, big_params), (accum, accum_params) = results
    assert len(big) == len(accum) == 8
    for a, b in zip(big, accum):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-12)
    _assert_same_params(big_params, accum_params, atol=1e-6)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint({"step": 1, "weights": torch.arange(4.0)}, folder, 1)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "weights": torch.zeros(4)}, folder, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == [first.name]  # no temp file, no step 2
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert torch.equal(ckpt.load_checkpoint(first)["weights"], torch.arange(4.0))


def test_optimizer_groups_schedule_and_layer_decay():
    cfg = toy_config("unused")
    model = ToyModel()
    optimizer = build_optimizer(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]}
                for g in optimizer.param_groups}
    assert by_decay[0.0] == {"embed.bias", "pos", "norm.weight", "norm.bias", "head.bias"}
    assert by_decay[0.05] == {"embed.weight", "head.weight"}
    assert not model.teacher.weight.requires_grad  # frozen, and in no group
    assert optimizer.defaults["betas"] == (0.9, 0.999)

    class Wrapper(nn.Module):  # a task wrapping a model: its frozen_prefixes still count
        def __init__(self):
            super().__init__()
            self.model = ToyModel()
            self.answer_head = nn.Linear(2, 3)

    wrapper = Wrapper()
    wrapped = {id(p) for g in build_optimizer(wrapper, cfg.train).param_groups for p in g["params"]}
    assert {n for n, p in wrapper.named_parameters() if id(p) not in wrapped} == \
        {"model.teacher.weight", "model.teacher.bias"}

    # cosine with warmup: lr at the end of warmup, at the midpoint of the decay, at the end
    base, low, warmup, total = 1.0, 0.1, 10, 110
    assert cosine_lr(0, base, low, warmup, total) == pytest.approx(0.1)
    assert cosine_lr(warmup - 1, base, low, warmup, total) == pytest.approx(base)
    assert cosine_lr(warmup, base, low, warmup, total) == pytest.approx(base)
    assert cosine_lr(60, base, low, warmup, total) == pytest.approx((base + low) / 2)
    assert cosine_lr(total, base, low, warmup, total) == pytest.approx(low)
    scheduler = build_scheduler(optimizer, 0.02, 0.001, 2, 10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:3] == pytest.approx([0.01, 0.02, 0.02])
    assert seen[-1] == pytest.approx(cosine_lr(9, 0.02, 0.001, 2, 10))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)

    class Layered(nn.Module):
        num_layers = 2

        def __init__(self):
            super().__init__()
            self.patch = nn.Linear(4, 4)
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.head = nn.Linear(4, 2)

        def layer_id(self, name: str) -> int:
            if name.startswith("patch"):
                return 0
            if name.startswith("blocks."):
                return int(name.split(".")[1]) + 1
            return self.num_layers + 1

    layered = Layered()
    cfg.train.layer_decay = 0.5
    optimizer = build_optimizer(layered, cfg.train)
    names = {id(p): n for n, p in layered.named_parameters()}
    scales = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scales["patch.weight"] == pytest.approx(0.5 ** 3)
    assert scales["blocks.0.weight"] == pytest.approx(0.5 ** 2)
    assert scales["blocks.1.bias"] == pytest.approx(0.5)
    assert scales["head.weight"] == pytest.approx(1.0)
    group = next(g for g in optimizer.param_groups if layered.patch.weight in g["params"])
    assert group["lr"] == pytest.approx(cfg.train.lr * 0.125)

    # per-prefix multipliers (a pretrained part at a tenth of the lr) stack on layer decay
    cfg.train.lr_scales = {"blocks.1": 0.1, "head": 2.0}
    optimizer = build_optimizer(layered, cfg.train)
    scales = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scales["blocks.1.weight"] == pytest.approx(0.05)
    assert scales["blocks.0.weight"] == pytest.approx(0.25) and scales["head.bias"] == 2.0
    cfg.train.lr_scales = {"trunk": 0.1}
    with pytest.raises(ValueError, match="no parameter of Layered starts with 'trunk'"):
        build_optimizer(layered, cfg.train)


class TiedToy(nn.Module):
    """Tied input/output embeddings: safetensors needs the shared tensor stored once."""

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.output = nn.Linear(width, vocab, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, ids):
        return self.output(torch.tanh(self.mix(self.embedding(ids))))


def test_save_and_load_pretrained_round_trip(tmp_path):
    factories = {"toy": ToyModel, "tied": TiedToy}

    def create_model(name, **kwargs):
        return factories[name](**kwargs)

    torch.manual_seed(0)
    model = ToyModel(hidden=12).eval()
    ckpt.save_pretrained(model, tmp_path / "toy", "toy", {"hidden": 12}, extra={"note": "hi"})
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["name"] == "toy" and config["kwargs"] == {"hidden": 12}
    assert config["leanvl_version"] and config["extra"] == {"note": "hi"}
    loaded = ckpt.load_pretrained(tmp_path / "toy", create_model_fn=create_model)
    inputs = torch.randn(5, 6)
    assert torch.equal(model(inputs), loaded(inputs))

    tied = TiedToy().eval()
    ckpt.save_pretrained(tied, tmp_path / "tied", "tied", {})
    loaded = ckpt.load_pretrained(tmp_path / "tied" / "model.safetensors", create_model)
    ids = torch.tensor([[1, 2, 3], [4, 5, 10]])
    assert torch.equal(tied(ids), loaded(ids))
    assert loaded.output.weight is loaded.embedding.weight


def test_nan_loss_stops_with_the_loss_name(tmp_path):
    class Exploding(ToyModel):
        def pretrain_losses(self, batch):
            losses = super().pretrain_losses(batch)
            losses["explode"] = torch.tensor(math.nan) if self.calls == 3 else \
                losses["regression"] * 0
            return losses

    trainer, model = _toy_run(tmp_path, model=Exploding())
    with pytest.raises(NonFiniteLossError, match=r"loss 'explode' is nan at step 3"):
        trainer.fit()
    assert trainer.step == 2  # the bad step never reached the optimizer
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_bad_samples_stop_the_run(tmp_path):
    # 24 clips and max_bad_fraction 0.1: the third distinct corrupt clip ends the run
    trainer, _ = _toy_run(tmp_path, ["data.max_bad_fraction=0.1"],
                          dataset=ToyDataset(bad=(1, 5, 9, 13)))
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction"):
        trainer.fit()
    assert trainer.tracker.num_bad >= 3 and trainer.step < 6  # stopped in the first epoch

    trainer, _ = _toy_run(tmp_path / "ok", ["data.max_bad_fraction=0.5"],
                          dataset=ToyDataset(bad=(1, 5)))
    result = trainer.fit()
    assert sum(h["skipped"] for h in result["history"]) == 2 * 3  # once per epoch
    assert result["train"]["bad_samples"] == 2


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert make_grad_scaler("auto", cpu) is None and make_grad_scaler("bf16", cpu) is None
    assert make_grad_scaler("fp16", cpu) is not None
    with autocast("bf16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("fp32", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    # attention under bf16 autocast on the CPU: bf16 out, the attention formula, gradients
    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    with autocast("bf16", cpu):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.dtype == torch.bfloat16
    expected = (q @ q.transpose(-1, -2) / 4.0).softmax(-1) @ q
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp8", cpu)


def test_loader_without_length_needs_max_steps(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            dataset = ToyDataset()
            return iter(dataset[i] for i in range(len(dataset)))

    loader = DataLoader(Stream(), batch_size=4, collate_fn=collate)
    cfg = toy_config(tmp_path, ["train.epochs=1"])
    with pytest.raises(ValueError, match="max_steps"):
        Trainer(cfg, ToyModel(), loader, device="cpu", progress=False)
    cfg = toy_config(tmp_path, ["train.max_steps=9", "train.warmup_steps=0"])
    result = Trainer(cfg, ToyModel(), loader, device="cpu", progress=False).fit()
    assert result["step"] == 9 and result["epoch"] == 1  # 6 batches per pass: two passes


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs(tmp_path, precision):
    class Checkpointed(ToyModel):
        grad_checkpointing = False

        def set_grad_checkpointing(self, enabled: bool = True) -> None:
            self.grad_checkpointing = enabled

    trainer, model = _toy_run(tmp_path, [f"train.precision={precision}", "train.epochs=1",
                                         "train.activation_checkpointing=true"],
                              model=Checkpointed())
    assert (trainer.scaler is not None) == (precision == "fp16")
    result = trainer.fit()
    assert model.grad_checkpointing
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]


def test_metrics_writer_jsonl_and_missing_tensorboard(tmp_path, caplog):
    from leanvl.engine.logging import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=True)  # works with or without tensorboard
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": torch.tensor(0.5 * step), "odd": math.nan})
    writer.truncate_after(2)
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 0.5, "odd": "nan"}, {"step": 2, "loss": 1.0, "odd": "nan"}]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in caplog.text


def test_load_pretrained_from_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(hidden=12).eval()
    state = {"model": ckpt.model_state(model, ["teacher."]),
             "model_excluded_prefixes": ["teacher."],
             "config": {"model": {"name": "toy", "kwargs": {"hidden": 12}}}}
    path = ckpt.save_checkpoint(state, tmp_path, 5)
    loaded = ckpt.load_pretrained(path, create_model_fn=lambda name, **kw: ToyModel(**kw))
    inputs = torch.randn(3, 6)
    assert torch.equal(model(inputs), loaded(inputs))
    assert loaded.registry_name == "toy"


def test_full_precision_turns_autocast_off_and_is_a_no_op_on_meta():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
        with full_precision("cpu"):
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16  # restored on exit
    with full_precision("meta"):  # FLOP counting runs models on meta tensors
        assert (torch.empty(3, 4, device="meta") @ torch.empty(4, 2, device="meta")).shape == (3, 2)
