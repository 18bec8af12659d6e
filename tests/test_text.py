import json
from pathlib import Path

import pytest
import torch

from leanvl.data.text import TextEncoder, VocabTruncation, load_tokenizer


def test_offline_bert_uncased_vocabulary():
    tokenizer = load_tokenizer("bert-base-uncased")
    assert len(tokenizer) == 30522
    ids = tokenizer("A Red Triangle moves LEFT.")["input_ids"]
    assert ids == [101, 1037, 2417, 9546, 5829, 2187, 1012, 102]  # lower-cased WordPiece


def test_local_tokenizer_folder_and_bad_name(tmp_path):
    load_tokenizer("bert-base-uncased").save_pretrained(tmp_path)
    assert len(load_tokenizer(str(tmp_path))) == 30522
    with pytest.raises(ValueError, match="neither a local folder"):
        load_tokenizer("no/such-tokenizer-anywhere")


def test_text_encoder_pads_and_masks():
    encoder = TextEncoder(max_len=8)
    out = encoder(["a red square", "a very long caption that will not fit in eight tokens"])
    assert out["text_ids"].shape == (2, 8) and out["text_mask"].shape == (2, 8)
    assert out["text_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert out["text_ids"][1, -1] == encoder.special_id("sep")
    assert encoder.special_id("pad") == 0
    short = encoder(["a red square", "a blue circle moves"])  # padded to the batch's longest
    assert short["text_ids"].shape == (2, 6) and short["text_mask"][1].all()
    assert TextEncoder(max_len=8, pad_to_max=True)(["a"])["text_ids"].shape == (1, 8)


@pytest.mark.parametrize("pad_to_max", [False, True])
def test_text_encoder_cuts_long_texts_as_the_tokenizer_does_and_says_so(caplog, pad_to_max):
    tokenizer = load_tokenizer("bert-base-uncased")
    texts = ["a red square", "a very long caption that will not fit in eight tokens",
             "a blue circle moves to left"]  # exactly 8 tokens: kept whole, not counted as cut
    encoder = TextEncoder(tokenizer, max_len=8, pad_to_max=pad_to_max)
    with caplog.at_level("WARNING", logger="leanvl.data.text"):
        out = encoder(texts)
        encoder(texts)
    reference = tokenizer(texts, padding="max_length" if pad_to_max else "longest",
                          truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(out["text_ids"], reference["input_ids"])
    assert torch.equal(out["text_mask"], reference["attention_mask"])
    cut = [r for r in caplog.records if "longer than max_text_len=8" in r.getMessage()]
    assert len(cut) == 1 and "1 of 3" in cut[0].getMessage()  # once per encoder
    caplog.clear()
    with caplog.at_level("WARNING", logger="leanvl.data.text"):
        TextEncoder(tokenizer, max_len=8)(texts[:1] + texts[2:])  # nothing to cut: silent
    assert not caplog.records


def test_vocab_truncation_keeps_top_fraction_by_frequency():
    tokenizer = load_tokenizer("bert-base-uncased")
    corpus = ["a red square moves left"] * 50 + ["a blue circle"] * 5 + ["zebra"]
    trunc = VocabTruncation.fit(corpus, tokenizer, keep_fraction=0.3)
    assert trunc.vocab_size == round(30522 * 0.3)
    encoder = TextEncoder(tokenizer, max_len=8, truncation=trunc)
    unk = encoder.special_id("unk")
    ids = encoder(["red square"])["text_ids"][0]
    assert unk not in ids[:4].tolist() and int(ids.max()) < trunc.vocab_size
    # the most frequent words get the smallest new ids, right after the special tokens
    specials = len(set(tokenizer.all_special_ids))
    red = tokenizer.convert_tokens_to_ids("red")
    assert int(trunc(torch.tensor(red))) < specials + 6
    # a word outside the kept set maps to [UNK]
    # with room for 3 words besides the 5 specials, the rare word maps to [UNK]
    tiny = VocabTruncation.fit(["red red red square"] * 50 + ["blue"] * 10 + ["zebra"],
                               tokenizer, keep_fraction=8 / 30522)
    assert tiny.vocab_size == 8
    unk_new = int(tiny(torch.tensor(tokenizer.unk_token_id)))
    assert int(tiny(torch.tensor(tokenizer.convert_tokens_to_ids("zebra")))) == unk_new
    kept = [int(tiny(torch.tensor(tokenizer.convert_tokens_to_ids(w)))) for w in ("red", "square", "blue")]
    assert kept == [5, 6, 7]


def test_vocab_truncation_save_load(tmp_path):
    tokenizer = load_tokenizer("bert-base-uncased")
    trunc = VocabTruncation.fit(["hello world"], tokenizer, 0.1)
    trunc.save(tmp_path / "vocab.json")
    loaded = VocabTruncation.load(tmp_path / "vocab.json", tokenizer.unk_token_id)
    assert torch.equal(loaded.table, trunc.table)


@pytest.mark.parametrize("name, kwargs", [
    ("umt_tiny", "{mask_type: random}"),
    ("perceiver_vl_tiny", "{image_size: 32, patch_size: 16, num_latents: 8, dim: 32, num_heads: 2, "
                          "num_blocks: 1, self_per_block: 1}")])
def test_pretraining_with_a_truncated_vocabulary_releases_and_reloads_it(tmp_path, name, kwargs):
    """data.vocab_keep_fraction < 1: the kept ids travel in config.json, and evaluation maps
    captions into the released model's vocabulary."""
    from leanvl.config import SynthConfig, load_config
    from leanvl.data import synthetic
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import build_text_encoder
    from leanvl.tasks.pretrain import run_pretrain

    synth_cfg = SynthConfig(out=str(tmp_path / "synth"), workers=1, frames=8, size=32,
                            pretrain_clips=8, retrieval_test_clips=2, mc_test_clips=2,
                            classify_train_clips=10, classify_test_clips=10)
    synthetic.generate(synth_cfg, progress=False)
    root = Path(synth_cfg.out)
    cfg = load_config(None, [
        f"out={tmp_path / 'run'}", f"model.name={name}", f"model.kwargs={kwargs}",
        f"data.root={root}", f"data.train={root / 'pretrain.jsonl'}", "data.num_frames=2",
        "data.size=32", "data.batch_size=4", "data.num_workers=0",
        "data.vocab_keep_fraction=0.01", "train.epochs=1", "train.precision=fp32"])
    run_pretrain(cfg, evaluate=lambda model: {}, progress=False)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    kept = config["kwargs"]["text_vocab_ids"]
    assert config["extra"]["data"] == {  # the input settings `leanvl eval` reads with
        "num_frames": 2, "size": 32, "max_text_len": 40, "tokenizer": "bert-base-uncased",
        "normalization": "clip"}  # mean and std only with normalization: custom
    assert len(kept) == round(30522 * 0.01)
    model = load_pretrained(tmp_path / "run" / "model")
    rows = model.embed.token_embed if name.startswith("perceiver") else \
        model.text_encoder.embeddings.word_embeddings
    assert rows.num_embeddings == len(kept) and model.text_vocab_ids == kept
    # a training checkpoint loads on its own too: it records the kept ids the build derived
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1]
    from_checkpoint = load_pretrained(checkpoint)
    assert from_checkpoint.text_vocab_ids == kept
    reloaded = from_checkpoint.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded[key], value), key
    # and training on from it keeps its vocabulary, whatever the new corpus counts
    from leanvl.tasks.build import truncate_vocabulary

    other = json.loads((root / "pretrain.jsonl").read_text().splitlines()[0])
    other["caption"] = ["zebra xylophone quartz"]
    (tmp_path / "other.jsonl").write_text(json.dumps(other) + "\n")
    onward = load_config(None, [f"model.name={name}", f"model.kwargs={kwargs}",
                                f"model.pretrained={checkpoint}", f"data.root={root}",
                                f"data.train={tmp_path / 'other.jsonl'}",
                                "data.vocab_keep_fraction=0.01"])
    assert truncate_vocabulary(onward, build_text_encoder(onward.data))["text_vocab_ids"] == kept
    text = build_text_encoder(cfg.data, model)
    caption = json.loads((root / "pretrain.jsonl").read_text().splitlines()[0])["caption"][0]
    ids = text([caption])["text_ids"][0]
    plain = build_text_encoder(cfg.data)([caption])["text_ids"][0]
    assert int(ids.max()) < len(kept) and torch.equal(torch.tensor(kept)[ids], plain)
    assert ids[0] == model.specials["cls"]


def test_vocabulary_corpus_counts_questions_answers_options_and_text_lines(tmp_path):
    from leanvl.config import load_config
    from leanvl.data.annotations import AnnotationError, corpus_texts, write_annotations
    from leanvl.tasks.build import truncate_vocabulary

    captions = write_annotations([{"video": "a.mp4", "caption": ["a red square moves left"]},
                                  {"video": "b.mp4", "caption": "a blue star spins",
                                   "negative_caption": "a blue star spins back"}],
                                 tmp_path / "captions.jsonl")
    qa = write_annotations([{"video": "a.mp4", "question": "how many objects are there",
                             "answer": "three"}], tmp_path / "qa.jsonl")
    mc = write_annotations([{"video": "a.mp4", "caption": ["one thing", "another thing"],
                             "answer": 1}], tmp_path / "mc.jsonl")
    (tmp_path / "words.txt").write_text("first line\n\n  second line  \n")
    assert corpus_texts(captions) == ["a red square moves left", "a blue star spins",
                                      "a blue star spins back"]
    assert corpus_texts(qa) == ["how many objects are there", "three"]
    assert corpus_texts(mc) == ["one thing", "another thing"]  # not the answer's index
    assert corpus_texts(tmp_path / "words.txt") == ["first line", "second line"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(AnnotationError, match="empty.txt.*no texts"):
        corpus_texts(tmp_path / "empty.txt")
    with pytest.raises(AnnotationError, match="missing.txt"):
        corpus_texts(tmp_path / "missing.txt")

    def kept_words(*overrides):
        cfg = load_config(None, [f"data.train={captions}", "data.vocab_keep_fraction=0.001",
                                 *overrides])
        text = TextEncoder(cfg.data.tokenizer, 16)
        kept = set(truncate_vocabulary(cfg, text)["text_vocab_ids"])
        return {w for w in ("square", "how", "objects", "three")
                if text.tokenizer.convert_tokens_to_ids(w) in kept}

    # 31 kept tokens: the captions' words, then low ids; the QA file's words only when counted
    assert kept_words() == {"square"}
    assert kept_words(f"data.vocab_corpus=[{captions},{qa}]") == {"square", "how", "objects",
                                                                  "three"}
