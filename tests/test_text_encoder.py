import pytest
import torch

from leanvl.nn.text import BertTextEncoder, mask_tokens

TINY = dict(vocab_size=120, hidden_size=64, text_layers=2, fusion_layers=2, num_heads=4,
            intermediate_size=128, max_positions=24)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = BertTextEncoder(**TINY, video_dim=48, mlm_head=True).eval()
    # fresh cross-attention starts near zero (std 0.02); make its effect unmistakable
    with torch.no_grad():
        for layer in model.encoder.layer[model.text_layers:]:
            for p in layer.crossattention.parameters():
                if p.dim() == 2:
                    p.normal_(std=0.3)
    return model


def _text(batch=2, length=10, pad_from=6):
    ids = torch.randint(5, 120, (batch, length), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2  # a [CLS]-like id
    mask = torch.ones_like(ids)
    mask[1, pad_from:] = 0
    ids[1, pad_from:] = 0
    return ids, mask


def test_split_layers_match_bert_names_and_only_fusion_layers_have_cross_attention(encoder):
    names = dict(encoder.named_parameters())
    assert "encoder.layer.0.attention.self.query.weight" in names
    assert not any(n.startswith("encoder.layer.1.crossattention") for n in names)
    assert names["encoder.layer.2.crossattention.self.key.weight"].shape == (64, 48)
    assert encoder(*_text()).shape == (2, 10, 64)


def test_cross_attention_uses_the_video_tokens(encoder):
    ids, mask = _text()
    with torch.no_grad():
        text = encoder(ids, mask)
        video = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(2))
        first = encoder.fuse(text, mask, video)
        again = encoder.fuse(text, mask, video.clone())
        other = encoder.fuse(text, mask, torch.randn(2, 7, 48))
        # a masked-out video token does not matter, a visible one does
        video_mask = torch.ones(2, 7, dtype=torch.long)
        video_mask[:, -1] = 0
        changed_last = video.clone()
        changed_last[:, -1] += 5
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1
    with torch.no_grad():
        masked_a = encoder.fuse(text, mask, video, video_mask)
        masked_b = encoder.fuse(text, mask, changed_last, video_mask)
    torch.testing.assert_close(masked_a, masked_b)


def test_padding_does_not_change_cls_in_text_or_fusion_layers(encoder):
    ids, mask = _text()
    longer_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    garbage = longer_ids.clone()
    garbage[1, 6:] = 77  # different ids under the padding mask
    video = torch.randn(2, 3, 48)
    with torch.no_grad():
        short = encoder(ids[1:, :6], mask[1:, :6])
        padded = encoder(garbage, longer_mask)
        torch.testing.assert_close(short[:, 0], padded[1:, 0], atol=1e-5, rtol=1e-5)
        fused_short = encoder.fuse(short, mask[1:, :6], video[1:])
        fused_padded = encoder.fuse(padded, longer_mask, video)
    torch.testing.assert_close(fused_short[:, 0], fused_padded[1:, 0], atol=1e-5, rtol=1e-5)


def test_fusion_self_attention_is_bidirectional(encoder):
    # transformers needs is_decoder=True for cross-attention; it must not make attention causal
    ids, mask = _text()
    video = torch.randn(2, 3, 48)
    with torch.no_grad():
        text = encoder(ids, mask)
        changed = text.clone()
        changed[0, 5] += 3.0
        a = encoder.fuse(text, mask, video)
        b = encoder.fuse(changed, mask, video)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3


def test_mlm_head_is_tied_to_the_word_embeddings(encoder):
    head = encoder.mlm_head
    assert head.decoder.weight is encoder.embeddings.word_embeddings.weight
    ids, mask = _text()
    logits = encoder.mlm_logits(encoder(ids, mask))
    assert logits.shape == (2, 10, 120)
    trainable = BertTextEncoder(**TINY, mlm_head=True)
    names = [n for n, _ in trainable.named_parameters()]
    assert "mlm_head.decoder.weight" not in names  # one parameter, counted once
    before = trainable.embeddings.word_embeddings.weight.detach().clone()
    optimizer = torch.optim.SGD(trainable.parameters(), lr=1.0)
    trainable.mlm_logits(trainable(ids, mask)).logsumexp(-1).mean().backward()
    optimizer.step()
    after = trainable.embeddings.word_embeddings.weight
    assert not torch.equal(before, after)
    assert trainable.mlm_head.decoder.weight is after


def test_mask_tokens_ratio_and_80_10_10_split():
    generator = torch.Generator().manual_seed(0)
    vocab, mask_id, special = 1000, 3, [0, 1, 2, 3]
    ids = torch.randint(10, vocab, (400, 60), generator=generator)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    mask[:, 40:] = 0
    ids[:, 40:] = 0
    masked, labels = mask_tokens(ids, mask, vocab, mask_id, special, ratio=0.5,
                                 generator=generator)
    picked = labels != -100
    assert torch.equal(labels[picked], ids[picked])
    assert not picked[:, 0].any() and not picked[:, 40:].any()  # special and pad never picked
    assert torch.equal(masked[~picked], ids[~picked])
    eligible = 400 * 38
    assert abs(picked.sum().item() / eligible - 0.5) < 0.02
    n = picked.sum().item()
    became_mask = (masked[picked] == mask_id).sum().item() / n
    unchanged = (masked[picked] == ids[picked]).sum().item() / n
    randomised = 1 - became_mask - unchanged
    assert abs(became_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.015  # (a random draw equal to the original is ~0.01%)
    assert abs(randomised - 0.1) < 0.015
    random_ids = masked[picked & (masked != mask_id) & (masked != ids)]
    assert not torch.isin(random_ids, torch.tensor(special)).any()
    again, _ = mask_tokens(ids, mask, vocab, mask_id, special, 0.5,
                           torch.Generator().manual_seed(5))
    same, _ = mask_tokens(ids, mask, vocab, mask_id, special, 0.5,
                          torch.Generator().manual_seed(5))
    assert torch.equal(again, same)


def test_mask_tokens_fifteen_percent():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 500, (300, 40), generator=generator)
    _, labels = mask_tokens(ids, torch.ones_like(ids), 500, 4, [0, 1, 2, 3, 4], 0.15, generator)
    assert abs((labels != -100).float().mean().item() - 0.15) < 0.01


def test_loading_a_local_bert_folder_reproduces_its_outputs(tmp_path):
    from transformers import BertForMaskedLM

    from leanvl.nn.text import bert_config

    torch.manual_seed(3)
    reference = BertForMaskedLM(bert_config(vocab_size=120, hidden_size=64, num_layers=4,
                                            num_heads=4, intermediate_size=128,
                                            max_positions=24)).eval()
    reference.save_pretrained(tmp_path / "bert")
    loaded = BertTextEncoder.from_pretrained(tmp_path / "bert", fusion_layers=2, mlm_head=True)
    ids, mask = _text()
    with torch.no_grad():
        expected = reference.bert(input_ids=ids, attention_mask=mask,
                                  output_hidden_states=True).hidden_states
        ours = loaded(ids, mask)
        torch.testing.assert_close(ours, expected[2], atol=1e-5, rtol=1e-5)
        # fusion layers keep the pretrained self-attention/FFN; only cross-attention is new
        ref_layer = reference.bert.encoder.layer[3].state_dict()
        for key, value in loaded.encoder.layer[3].state_dict().items():
            if not key.startswith("crossattention."):
                assert torch.equal(value, ref_layer[key]), key
        # the MLM head weights come along too (tied decoder, transform, bias)
        hidden = ours
        extended = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for index in (2, 3):
            hidden = reference.bert.encoder.layer[index](hidden, extended)
        torch.testing.assert_close(hidden, expected[4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.mlm_logits(hidden), reference.cls(hidden),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layers"):
        BertTextEncoder.from_pretrained(tmp_path / "bert", fusion_layers=3, text_layers=3)
    with pytest.raises(FileNotFoundError):
        BertTextEncoder.from_pretrained(tmp_path / "missing")
    # dropout rates can replace the checkpoint's (the demo trains without dropout)
    quiet = BertTextEncoder.from_pretrained(tmp_path / "bert", fusion_layers=2, dropout=0.0,
                                            attention_dropout=0.0).train()
    assert quiet.config.hidden_dropout_prob == 0 and quiet.config.attention_probs_dropout_prob == 0
    with torch.no_grad():  # deterministic in training mode, fusion layers included
        video = torch.randn(ids.shape[0], 5, 64)
        first = quiet.fuse(quiet(ids, mask), mask, video)
        torch.testing.assert_close(quiet.fuse(quiet(ids, mask), mask, video), first)
    assert loaded.config.hidden_dropout_prob == 0.1  # None keeps the checkpoint's


def test_keep_tokens_slices_embeddings_and_the_tied_mlm_head(encoder):
    import copy

    kept = [0, 2, 7, 9, 11, 40, 41, 99, 119]
    small = copy.deepcopy(encoder)
    small.keep_tokens(kept)
    assert small.config.vocab_size == len(kept)
    assert small.mlm_head.decoder.weight is small.embeddings.word_embeddings.weight
    assert small.embeddings.word_embeddings.padding_idx == 0  # pad id 0 stayed first
    original = torch.tensor([[2, 7, 9, 40, 119, 0]])
    mapped = torch.tensor([[kept.index(int(i)) for i in original[0]]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    full_tokens, small_tokens = encoder(original, mask), small(mapped, mask)
    assert torch.allclose(full_tokens, small_tokens, atol=1e-6)
    full_logits = encoder.mlm_logits(full_tokens)[..., kept]
    assert torch.allclose(small.mlm_logits(small_tokens), full_logits, atol=1e-5)
    with pytest.raises(ValueError, match="kept token ids"):
        copy.deepcopy(encoder).keep_tokens([0, 500])
