"""The synthetic benchmark: time reversal, determinism, held-out compositions, real files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvl.config import SynthConfig
from leanvl.data import synthetic as synth
from leanvl.data.annotations import load_annotations
from leanvl.data.video import read_all_frames, read_frames, sample_frame_indices

TINY = dict(pretrain_clips=30, retrieval_test_clips=20, mc_test_clips=24,
            classify_train_clips=20, classify_test_clips=20, qa_per_clip=2, frames=8, size=32,
            fps=8.0, held_out_fraction=0.15, seed=3)
STATIC_KEYS = ("background", "background_colour", "colour", "shape", "size", "position")


def flat(facts: dict) -> dict:
    """Facts as {'background': ..., 'objects.1.colour': ...} (written here, not imported)."""
    out = {k: v for k, v in facts.items() if k != "objects"}
    for i, obj in enumerate(facts["objects"]):
        for key, value in obj.items():
            out[f"objects.{i}.{key}"] = value
    return out


def differing(a: dict, b: dict) -> list[str]:
    fa, fb = flat(a), flat(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cfg = SynthConfig(out=str(tmp_path_factory.mktemp("synth") / "a"), workers=2, **TINY)
    summary = synth.generate(cfg, progress=False)
    return cfg, summary, Path(cfg.out)


def records(out: Path, stem: str) -> list[dict]:
    return load_annotations(out / f"{stem}.jsonl")


# ----------------------------------------------------------------------------- time reversal

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1),
       kind=st.sampled_from(["general", "temporal_single", "temporal_order", "classify"]),
       frames=st.integers(6, 10), noise=st.sampled_from([0.0, 0.05]))
def test_reversed_spec_renders_the_frames_backwards_bit_for_bit(seed, kind, frames, noise):
    rng = np.random.default_rng(seed)
    label = synth.CLASSES[seed % len(synth.CLASSES)] if kind == "classify" else None
    spec = synth.sample_scene(rng, kind, max_objects=3, noise=noise, label=label)
    forward = synth.render(spec, frames, 32)
    backward = synth.render(spec.reversed(), frames, 32)
    np.testing.assert_array_equal(backward, forward[::-1])
    assert spec.reversed().reversed() == spec
    assert synth.SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # The mechanism, exactly: every object's state at t equals its reversal's at T-1-t.
    for obj in spec.objects:
        for t in range(frames):
            assert obj.state(t, frames) == obj.reversed().state(frames - 1 - t, frames)
    # Reversal flips exactly the temporal facts, and those make the clip not a palindrome.
    flipped = differing(spec.facts, spec.reversed().facts)
    assert flipped == sorted(spec.temporal_facts())
    if flipped:
        assert not np.array_equal(forward, forward[::-1])


def test_temporal_motions_change_the_frames_as_described():
    """Left/right, up/down and clockwise are what the pixels do (so reversal is meaningful)."""
    def centroid(motion, start, end):
        obj = synth.ObjectSpec("arrow", "white", "large", None, motion, start=start, end=end)
        video = synth.render(synth.SceneSpec((obj,)), 8, 64).astype(float).sum(-1)
        weights = video > 300
        ys, xs = np.nonzero(weights[0])
        ye, xe = np.nonzero(weights[-1])
        return (xs.mean(), ys.mean()), (xe.mean(), ye.mean()), weights

    (x0, _), (x1, _), _ = centroid("move left", (0.8, 0.5, 0, 0.15, 1), (0.2, 0.5, 0, 0.15, 1))
    assert x1 < x0 - 20
    (_, y0), (_, y1), _ = centroid("move up", (0.5, 0.8, 0, 0.15, 1), (0.5, 0.2, 0, 0.15, 1))
    assert y1 < y0 - 20
    # An arrow pointing right, turned 90 degrees clockwise, points down: the widest row (the
    # base of its head) is then below the centre; turned anticlockwise it is above.
    for motion, angle, below in (("rotate clockwise", 90, True),
                                 ("rotate anticlockwise", -90, False)):
        _, _, mask = centroid(motion, (0.5, 0.5, 0, 0.3, 1), (0.5, 0.5, angle, 0.3, 1))
        assert mask[0].sum(0).argmax() > 32  # pointing right at the start
        assert (mask[-1].sum(1).argmax() > 32) == below


@pytest.mark.parametrize("frames,num_frames", [(8, 4), (16, 4), (16, 8)])
@pytest.mark.parametrize("sampling", ["middle", "uniform"])
def test_both_events_of_an_ordered_pair_show_in_sparsely_sampled_frames(frames, num_frames,
                                                                          sampling):
    """An evaluation that samples a few frames sees each event of an ordered pair, so the order
    MC items are answerable from the frames a model gets (the demo: 4 of 8, middle frames)."""
    picks = sample_frame_indices(num_frames, frames, sampling)
    for motion in synth.EVENTS:
        for phase in ("early", "late"):
            obj = synth.ObjectSpec("arrow", "white", "large", "centre", motion, phase=phase,
                                   start=(0.5, 0.5, 0, 0.15, 1), end=(0.5, 0.5, 0, 0.15, 1))
            rest = obj.state(0 if phase == "late" else frames - 1, frames)
            acting = [t for t in picks if obj.state(t, frames) != rest]
            assert acting, (motion, phase, picks)
            # and only within its own half of the clip
            half = range(frames // 2) if phase == "early" else range((frames - 1) // 2 + 1, frames)
            assert all(t in half for t in acting), (motion, phase, acting)


# ----------------------------------------------------------------------------- multiple choice

def test_temporal_mc_distractors_are_captions_of_the_reversed_clip(bench):
    cfg, _, out = bench
    items = [r for r in records(out, "mc_test") if r["kind"] == "temporal"]
    assert len(items) == TINY["mc_test_clips"] // 2
    held = [tuple(p) for p in json.loads((out / "summary.json").read_text())["held_out_combos"]]
    for item in items:
        index = int(Path(item["video"]).stem.split("_")[-1])
        spec = synth.scene_for(cfg, "mc_test", index, held)
        assert spec.facts == item["facts"]
        assert len(spec.temporal_facts()) == 1 and spec.temporal_facts()[0] == item["changed"]
        np.testing.assert_array_equal(synth.render(spec.reversed(), cfg.frames, cfg.size),
                                      synth.render(spec, cfg.frames, cfg.size)[::-1])
        options, answer = item["caption"], item["answer"]
        assert len(options) == 5 and len(set(options)) == 5
        assert len(set(item["option_templates"])) == 5
        for k, (text, template) in enumerate(zip(options, item["option_templates"])):
            source = spec if k == answer else spec.reversed()
            rng = np.random.default_rng(item["caption_seed"])
            assert text == source.caption(rng, template=template)
            if k != answer:
                assert differing(item["facts"], item["option_facts"][k]) == [item["changed"]]
                assert item["option_facts"][k] == spec.reversed().facts


def test_pretrain_clips_with_motion_carry_captions_of_their_reversal(bench):
    cfg, _, out = bench
    assert not any("negative_caption" in r for r in records(out, "pretrain"))  # opt-in
    held = [tuple(p) for p in json.loads((out / "summary.json").read_text())["held_out_combos"]]
    negative_cfg = dataclasses.replace(cfg, negative_captions=True)
    with_negatives = 0
    for index in range(cfg.pretrain_clips):
        spec, written = synth.clip_records(negative_cfg, "pretrain", index, held)
        record = written["pretrain"]
        negatives = record.get("negative_caption", [])
        assert bool(negatives) == bool(spec.temporal_facts())
        assert not set(negatives) & set(record["caption"])
        for text in negatives:  # each names what every directional motion looks like backwards
            for obj in spec.objects:
                if synth.REVERSE[obj.motion] != obj.motion:
                    phrases = synth._MOTION_PHRASES[synth.REVERSE[obj.motion]]
                    assert any(phrase in text for phrase in phrases), (text, obj.motion)
        with_negatives += bool(negatives)
    assert 0 < with_negatives < cfg.pretrain_clips


def test_pretrain_clips_say_whether_their_reversal_contradicts_them(bench):
    cfg, _, out = bench
    assert not any("reversal_negative" in r for r in records(out, "pretrain"))  # opt-in
    held = [tuple(p) for p in json.loads((out / "summary.json").read_text())["held_out_combos"]]
    flagged_cfg = dataclasses.replace(cfg, reversal_negatives=True)
    flags = []
    for index in range(cfg.pretrain_clips):
        spec, written = synth.clip_records(flagged_cfg, "pretrain", index, held)
        flag = written["pretrain"]["reversal_negative"]
        # true exactly when the reversed scene's captions differ from the clip's
        reversed_captions = synth._captions(spec.reversed(), np.random.default_rng(index), 1)
        captions = synth._captions(spec, np.random.default_rng(index), 1)
        assert flag == bool(spec.temporal_facts()) == (reversed_captions != captions)
        flags.append(flag)
    assert any(flags) and not all(flags)


def test_static_mc_distractors_change_one_single_frame_fact(bench):
    _, _, out = bench
    items = [r for r in records(out, "mc_test") if r["kind"] == "static"]
    assert len(items) == TINY["mc_test_clips"] // 2
    for item in items:
        truth = item["option_facts"][item["answer"]]
        assert truth == item["facts"]
        key = item["changed"]
        assert key.split(".")[-1] in STATIC_KEYS
        values = set()
        for k, facts in enumerate(item["option_facts"]):
            values.add(json.dumps(flat(facts)[key]))
            if k != item["answer"]:
                assert differing(truth, facts) == [key]
        assert len(values) == 5  # one slot, five different values: no odd one out
    answers = [r["answer"] for r in records(out, "mc_test")]
    assert len(set(answers)) >= 3  # the answer position is random


# ----------------------------------------------------------------------------- determinism

def test_same_config_same_data_for_any_worker_count(bench, tmp_path):
    cfg, _, out = bench
    other = dataclasses.replace(cfg, out=str(tmp_path / "b"), workers=1)
    synth.generate(other, progress=False)
    for name in synth.ANNOTATION_FILES + ("answers.json", "classes.json"):
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for video in ("videos/pretrain_000007.mp4", "videos/mc_test_000010.mp4"):
        np.testing.assert_array_equal(read_all_frames(out / video),
                                      read_all_frames(tmp_path / "b" / video))
    spec = synth.scene_for(cfg, "pretrain", 7)
    np.testing.assert_array_equal(synth.render(spec, 8, 32),
                                  synth.render(synth.scene_for(cfg, "pretrain", 7), 8, 32))
    # ... and a different seed gives different clips.
    reseeded = dataclasses.replace(cfg, seed=cfg.seed + 1)
    assert synth.scene_for(reseeded, "pretrain", 7) != spec


def test_regenerating_reuses_existing_clips(bench):
    cfg, first, out = bench
    before = (out / "pretrain.jsonl").read_bytes()
    again = synth.generate(cfg, progress=False)
    total = sum(first["clips"].values())
    assert first["encoded"] == total and again["encoded"] == 0 and again["reused"] == total
    assert (out / "pretrain.jsonl").read_bytes() == before
    assert not list(out.rglob("*.tmp*"))


# ----------------------------------------------------------------------------- held out

def test_held_out_combinations_only_in_test_splits(bench):
    _, summary, out = bench
    held = {tuple(p) for p in summary["held_out_combos"]}
    assert len(held) == round(TINY["held_out_fraction"] * 64)
    assert {c for c, _ in held} < set(synth.COLOURS) or len({c for c, _ in held}) < 8

    def combos(rows):
        return {(o["colour"], o["shape"]) for r in rows for o in r["facts"]["objects"]}

    train_videos = set()
    for stem in ("pretrain", "classify_train"):
        rows = records(out, stem)
        train_videos |= {r["video"] for r in rows}
        assert rows and not combos(rows) & held, stem
    qa_train = records(out, "qa_train")
    assert {r["video"] for r in qa_train} <= train_videos
    for r in qa_train:
        assert not any(f"{c} {s}" in r["question"] for c, s in held)
    for stem in ("retrieval_test", "mc_test", "classify_test"):
        rows = records(out, stem)
        assert combos(rows) & held, stem
        assert any(r["held_out"] for r in rows)
    # every colour and every shape is still seen in training
    seen = combos(records(out, "pretrain"))
    assert {c for c, _ in seen} == set(synth.COLOURS) or len(seen) < 20


# ----------------------------------------------------------------------------- files

def test_every_split_loads_and_has_the_promised_content(bench):
    cfg, summary, out = bench
    kinds = {"pretrain": "retrieval", "retrieval_test": "retrieval", "qa_train": "qa",
             "qa_test": "qa", "mc_test": "mc", "classify_train": "classification",
             "classify_test": "classification"}
    for stem, kind in kinds.items():
        rows = load_annotations(out / f"{stem}.jsonl", kind=kind)
        assert len(rows) == summary["records"][stem] > 0
        assert all((out / r["video"]).is_file() and not Path(r["video"]).is_absolute()
                   for r in rows)
    pretrain = records(out, "pretrain")
    assert all(isinstance(r["caption"], list) and len(set(r["caption"])) == 3 for r in pretrain)
    assert len(records(out, "qa_train")) == 2 * TINY["pretrain_clips"]
    assert len(records(out, "qa_test")) == 2 * TINY["retrieval_test_clips"]
    # retrieval captions describe the whole clip: every object and the background
    for r in records(out, "retrieval_test"):
        facts = r["facts"]
        assert facts["background_colour"] in r["caption"]
        for obj in facts["objects"]:
            assert f"{obj['colour']} {obj['shape']}" in r["caption"]
    assert 0.9 <= summary["retrieval_unique_captions"] <= 1.0
    answers = json.loads((out / "answers.json").read_text())
    qa = records(out, "qa_train") + records(out, "qa_test")
    assert {q["answer"] for q in qa} <= set(answers)
    assert {"yes", "no"} <= {q["answer"] for q in qa}
    assert any(q["temporal"] for q in qa) and not all(q["temporal"] for q in qa)
    classes = json.loads((out / "classes.json").read_text())
    labels = [r["label"] for r in records(out, "classify_train")]
    assert set(labels) == set(classes) and all(synth.REVERSE[c] in classes for c in classes)
    for r in records(out, "classify_train"):  # the labelled object really does that
        assert r["label"] in [o["motion"] for o in r["facts"]["objects"]]
    assert summary["mc_kinds"] == {"temporal": 12, "static": 12}
    text = synth.format_summary(summary)
    assert "retrieval_test.jsonl" in text and "held-out" in text


def test_mp4s_decode_to_the_rendered_frames(bench):
    cfg, _, out = bench
    frames, _ = read_frames(out / "videos/retrieval_test_000003.mp4", num_frames=cfg.frames,
                            sampling="uniform")
    assert frames.shape == (cfg.frames, cfg.size, cfg.size, 3) and frames.dtype == np.uint8
    rendered = synth.render(synth.scene_for(cfg, "retrieval_test", 3), cfg.frames, cfg.size)
    other = synth.render(synth.scene_for(cfg, "retrieval_test", 4), cfg.frames, cfg.size)
    error = np.abs(frames.astype(float) - rendered).mean()
    assert error < 10 and error < np.abs(frames.astype(float) - other).mean() / 2


# ----------------------------------------------------------------------------- captions

def test_one_fact_is_paraphrased_across_templates():
    obj = synth.ObjectSpec("triangle", "red", "small", None, "move left",
                           start=(0.8, 0.5, 0, 0.1, 1), end=(0.2, 0.5, 0, 0.1, 1))
    spec = synth.SceneSpec((obj,), background="plain", background_colour="navy")
    captions = {spec.caption(seed) for seed in range(40)}
    assert len(captions) >= 10
    motion_words = {p for p in synth._MOTION_PHRASES["move left"] if any(p in c for c in captions)}
    assert len(motion_words) >= 4
    assert all("left" in c and "right" not in c and "red triangle" in c for c in captions)
    assert all("right" in spec.reversed().caption(seed) for seed in range(10))
    templates = {spec.caption(0, template=t) for t in range(len(synth.TEMPLATES))}
    assert len(templates) == len(synth.TEMPLATES)
    # position paraphrases keep their meaning
    words = {"left": ("left",), "right": ("right",), "top": ("top", "upper"),
             "bottom": ("bottom", "lower")}
    for position, phrases in synth._POSITION_PHRASES.items():
        for phrase in phrases:
            for word, synonyms in words.items():
                assert (word in position) == any(w in phrase for w in synonyms), phrase


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        synth.generate(SynthConfig(out=str(tmp_path), frames=4), progress=False)
    with pytest.raises(ValueError, match="size"):
        synth.generate(SynthConfig(out=str(tmp_path), size=33), progress=False)
