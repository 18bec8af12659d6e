"""BERT text encoder split into a text-only part and a cross-modal fusion part, an MLM head with
tied word embeddings, and BERT's 80/10/10 token masking.

The layout follows UMT and SMAUG: the first ``text_layers`` BERT layers encode the caption alone
(giving token features and the [CLS] used for contrastive learning); the last ``fusion_layers``
layers are the cross-modal decoder, i.e. BERT layers with an extra cross-attention block that
attends to video tokens. State-dict keys match Hugging Face's ``BertModel`` (``embeddings.*``,
``encoder.layer.{i}.*``; ``encoder.layer.{i}.crossattention.*`` in fusion layers), so pretrained
BERT weights load by name and the cross-attention weights are the only new ones.

Built on ``transformers``' ``BertEmbeddings``/``BertLayer``; the layers are run here directly,
with additive float masks (0 = attend, dtype minimum = ignore), which both the eager and the
SDPA attention implementations accept.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Checkpoint keys that BertModel(add_pooling_layer=False) leaves out on purpose.
_UNUSED_BERT_KEYS = ("pooler.",)


class _quiet_transformers:
    """No load-report table and no "Loading weights" bar from transformers while loading:
    ``_log_loading_info`` says in one line what the table would."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.verbosity = hf_logging.get_verbosity()
        self.bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.verbosity)
        if self.bar:
            hf_logging.enable_progress_bar()


def _log_loading_info(folder: Path, info: dict) -> None:
    """One log line on a BERT checkpoint's keys that did not load (INFO when any matter)."""
    unused = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(_UNUSED_BERT_KEYS))
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unused or mismatched:
        log.info("%s: weights starting fresh: %s; checkpoint keys not used: %s; shape "
                 "mismatches: %s", folder, ", ".join(missing) or "none",
                 ", ".join(unused) or "none", ", ".join(mismatched) or "none")
    else:
        log.debug("%s: all BERT weights loaded (the pooler is not used)", folder)

#: BERT-uncased special token ids (override for other tokenizers / truncated vocabularies)
BERT_SPECIALS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def truncated_specials(kept_ids: Sequence[int] | None) -> dict[str, int]:
    """BERT-uncased special ids in a vocabulary truncated to ``kept_ids`` (original ids in
    their new order); the plain ids without truncation."""
    if not kept_ids:
        return dict(BERT_SPECIALS)
    position = {int(token): i for i, token in enumerate(kept_ids)}
    missing = [name for name, token in BERT_SPECIALS.items() if token not in position]
    if missing:
        raise ValueError(f"the truncated vocabulary lacks the special tokens {missing}")
    return {name: position[token] for name, token in BERT_SPECIALS.items()}


def model_specials(kept_ids: Sequence[int] | None,
                   special_ids: dict[str, int] | None = None) -> dict[str, int]:
    """A model's special ids: ``special_ids`` when it names them all (as a released config
    does), else those of the vocabulary truncated to ``kept_ids`` updated with the given ones."""
    given = dict(special_ids or {})
    if set(given) >= set(BERT_SPECIALS):
        return given
    return {**truncated_specials(kept_ids), **given}


# Attention implementations that take an additive float mask (flash-attention does not).
_MASKABLE_ATTENTION = ("sdpa", "eager")


def bert_config(vocab_size: int = 30522, hidden_size: int = 768, num_layers: int = 12,
                num_heads: int = 12, intermediate_size: int = 3072, max_positions: int = 512,
                dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                pad_token_id: int = 0, attn_implementation: str = "sdpa"):
    """A ``transformers.BertConfig`` from the sizes that matter (defaults: BERT-base)."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout,
                        layer_norm_eps=layer_norm_eps, pad_token_id=pad_token_id)
    config._attn_implementation = attn_implementation
    return config


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B x L (1 = keep) -> B x 1 x 1 x L additive attention mask (0 keep, dtype minimum drop)."""
    if mask.dim() != 2:
        raise ValueError(f"attention mask must be B x L, got shape {tuple(mask.shape)}")
    keep = mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(
        ~keep, torch.finfo(dtype).min)


class _Encoder(nn.Module):
    """Holds ``layer`` so parameter names match ``BertModel.encoder.layer.{i}``."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertTextEncoder(nn.Module):
    """BERT: ``text_layers`` text-only layers, then ``fusion_layers`` layers with cross-attention.

    ``forward(ids, mask)`` (= ``encode_text``) returns the text-only token features B x L x D
    (``[:, 0]`` is [CLS]); ``fuse(text_tokens, text_mask, video_tokens, video_mask)`` runs the
    fusion layers over text features while attending to video tokens and returns B x L x D.
    ``video_dim`` is the width of the video tokens (cross-attention keys/values project from it,
    like ALBEF/UMT's ``encoder_width``); default: the hidden size.
    """

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 768, text_layers: int = 9,
                 fusion_layers: int = 3, num_heads: int = 12, intermediate_size: int = 3072,
                 max_positions: int = 512, dropout: float = 0.1, attention_dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, pad_token_id: int = 0, video_dim: int | None = None,
                 mlm_head: bool = False, attn_implementation: str = "sdpa", *, config=None,
                 _base=None):
        super().__init__()
        from transformers import BertModel

        if config is None:
            config = bert_config(vocab_size, hidden_size, text_layers + fusion_layers, num_heads,
                                 intermediate_size, max_positions, dropout, attention_dropout,
                                 layer_norm_eps, pad_token_id, attn_implementation)
        if text_layers < 0 or fusion_layers < 0:
            raise ValueError("text_layers and fusion_layers must be >= 0")
        if text_layers + fusion_layers != config.num_hidden_layers:
            raise ValueError(f"text_layers ({text_layers}) + fusion_layers ({fusion_layers}) must "
                             f"equal the BERT's {config.num_hidden_layers} layers")
        if config._attn_implementation not in _MASKABLE_ATTENTION:
            config._attn_implementation = "sdpa"
        base = _base if _base is not None else BertModel(config, add_pooling_layer=False)
        self.config = base.config
        self.text_layers, self.fusion_layers = text_layers, fusion_layers
        self.video_dim = int(video_dim or self.config.hidden_size)
        self.embeddings = base.embeddings
        layers = list(base.encoder.layer)
        for index in range(text_layers, len(layers)):
            layers[index] = self._fusion_layer(layers[index], index)
        self.encoder = _Encoder(layers)
        self.mlm_head = BertMLMHead(self.embeddings.word_embeddings, self.config.hidden_act,
                                    self.config.layer_norm_eps) if mlm_head else None
        # the BERT folder whose weights had no MLM head (set by from_pretrained; the head starts
        # fresh unless weights loaded afterwards fill it: see tasks.build.build_model)
        self.mlm_head_source: str | None = None

    def _fusion_layer(self, text_layer: nn.Module, index: int) -> nn.Module:
        """A BERT layer with cross-attention that keeps ``text_layer``'s other weights."""
        from transformers.models.bert.modeling_bert import BertLayer

        config = copy.deepcopy(self.config)
        # transformers requires is_decoder for cross-attention; the causal flag is switched off
        # below and a full mask is always passed, so self-attention stays bidirectional.
        config.is_decoder, config.add_cross_attention = True, True
        layer = BertLayer(config, layer_idx=index)
        attention = layer.crossattention.self
        if self.video_dim != config.hidden_size:
            attention.key = nn.Linear(self.video_dim, attention.all_head_size)
            attention.value = nn.Linear(self.video_dim, attention.all_head_size)
        for module in layer.crossattention.modules():
            _init_like_bert(module, config.initializer_range)
        missing, unexpected = layer.load_state_dict(text_layer.state_dict(), strict=False)
        if unexpected or any(not name.startswith("crossattention.") for name in missing):
            raise RuntimeError(f"fusion layer {index}: unexpected weights {unexpected}, "
                               f"missing {missing}")
        layer.attention.self.is_causal = False
        return layer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, fusion_layers: int = 3,
                        text_layers: int | None = None, video_dim: int | None = None,
                        mlm_head: bool = False, attn_implementation: str = "sdpa",
                        dropout: float | None = None, attention_dropout: float | None = None
                        ) -> BertTextEncoder:
        """Load BERT weights from a local folder (``save_pretrained`` layout); never downloads.

        ``text_layers`` defaults to the checkpoint's layers minus ``fusion_layers``; fewer layers
        than the checkpoint has keeps the first ones. Cross-attention weights are new. With
        ``mlm_head``, the checkpoint's ``cls.predictions`` weights are loaded when it has them.
        ``dropout`` / ``attention_dropout`` replace the checkpoint's rates (None keeps them).
        """
        from transformers import BertModel

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"BERT folder not found: {folder} (loading is local only)")
        rates = {name: float(value) for name, value in
                 (("hidden_dropout_prob", dropout), ("attention_probs_dropout_prob",
                                                     attention_dropout)) if value is not None}
        if torch.get_default_device().type == "meta":
            # sizing a model without weights (profiling, preset checks): the folder's config only
            from transformers import BertConfig

            config = BertConfig.from_pretrained(str(folder), local_files_only=True, **rates)
            config._attn_implementation = attn_implementation
            base = BertModel(config, add_pooling_layer=False)
        else:
            with _quiet_transformers():
                base, info = BertModel.from_pretrained(
                    str(folder), local_files_only=True, add_pooling_layer=False,
                    attn_implementation=attn_implementation, output_loading_info=True, **rates)
            _log_loading_info(folder, info)
        total = base.config.num_hidden_layers
        text_layers = total - fusion_layers if text_layers is None else text_layers
        wanted = text_layers + fusion_layers
        if wanted > total:
            raise ValueError(f"{folder} has {total} layers; {text_layers} text + {fusion_layers} "
                             "fusion layers were asked for")
        if wanted < total:
            base.encoder.layer = base.encoder.layer[:wanted]
            base.config.num_hidden_layers = wanted
        encoder = cls(text_layers=text_layers, fusion_layers=fusion_layers, video_dim=video_dim,
                      mlm_head=mlm_head, config=base.config, _base=base)
        if mlm_head and torch.get_default_device().type != "meta":
            encoder._load_mlm_head(folder)
        return encoder.eval()

    def _load_mlm_head(self, folder: Path) -> None:
        """Copy ``cls.predictions.{transform.*, bias}`` from the folder's weights, if present."""
        state = _read_weights(folder)
        prefix = "cls.predictions."
        wanted = {k[len(prefix):]: v for k, v in state.items()
                  if k.startswith(prefix) and not k.startswith(prefix + "decoder.")}
        if not wanted:
            # released weights usually fill the head next; build_model says when none do
            log.debug("%s has no MLM head weights", folder)
            self.mlm_head_source = str(folder)
            return
        missing, unexpected = self.mlm_head.load_state_dict(wanted, strict=False)
        missing = [m for m in missing if not m.startswith("decoder.")]
        if missing or unexpected:
            raise RuntimeError(f"MLM head from {folder}: missing {missing}, "
                               f"unexpected {unexpected}")

    def keep_tokens(self, token_ids: Sequence[int]) -> None:
        """Truncate the vocabulary to ``token_ids`` (E-ViLM): row i of the new word embeddings
        (and of the tied MLM decoder and its bias) is row ``token_ids[i]`` of the old ones."""
        index = torch.as_tensor(list(token_ids), dtype=torch.long)
        old = self.embeddings.word_embeddings
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= old.num_embeddings:
            raise ValueError(f"kept token ids must lie in [0, {old.num_embeddings}); got "
                             f"{index.numel()} ids")
        kept = index.tolist()
        padding = kept.index(old.padding_idx) if old.padding_idx in kept else None
        new = nn.Embedding(len(index), old.embedding_dim, padding_idx=padding)
        new.weight.data.copy_(old.weight.data[index])
        self.embeddings.word_embeddings = new
        self.config.vocab_size = len(index)
        if self.mlm_head is not None:
            bias = self.mlm_head.bias.data[index].clone()
            self.mlm_head.decoder = nn.Linear(old.embedding_dim, len(index), bias=False)
            self.mlm_head.decoder.weight = new.weight  # still tied
            self.mlm_head.bias = nn.Parameter(bias)

    @property
    def hidden_size(self) -> int:
        """Width of the token features."""
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Text plus fusion layers."""
        return self.text_layers + self.fusion_layers

    def embed(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Word + position + token-type embeddings (LayerNorm, dropout): B x L x D."""
        return self.embeddings(input_ids=ids, token_type_ids=token_type_ids)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only features B x L x D after the first ``text_layers`` layers."""
        _check_text(ids, mask)
        hidden = self.embed(ids, token_type_ids)
        attention = additive_mask(mask, hidden.dtype)
        for layer in self.encoder.layer[: self.text_layers]:
            hidden = layer(hidden, attention_mask=attention)
        return hidden

    encode_text = forward

    def fuse(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             video_tokens: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion layers over text features with cross-attention to video tokens: B x L x D."""
        if video_tokens.dim() != 3 or video_tokens.shape[-1] != self.video_dim:
            raise ValueError(f"video tokens must be B x N x {self.video_dim}, got "
                             f"{tuple(video_tokens.shape)}")
        if video_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"{video_tokens.shape[0]} videos for {text_tokens.shape[0]} texts")
        hidden = text_tokens
        attention = additive_mask(text_mask, hidden.dtype)
        if video_mask is None:
            video_mask = torch.ones(video_tokens.shape[:2], dtype=torch.long,
                                    device=video_tokens.device)
        video_tokens = video_tokens.to(hidden.dtype)
        cross = additive_mask(video_mask, hidden.dtype)
        for layer in self.encoder.layer[self.text_layers:]:
            hidden = layer(hidden, attention_mask=attention, encoder_hidden_states=video_tokens,
                           encoder_attention_mask=cross)
        return hidden

    def mlm_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits B x L x V from (fused) token features, via the tied MLM head."""
        if self.mlm_head is None:
            raise RuntimeError("built without mlm_head=True")
        return self.mlm_head(tokens)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, i + 1 for layer i."""
        if name.startswith("embeddings."):
            return 0
        if name.startswith("encoder.layer."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1


#: named BERT sizes with their text / fusion split (tiny for CPU tests; base and large as UMT's
#: and SMAUG's BERT-base 9 + 3 and UMT-L's BERT-large 19 + 5)
TEXT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "text_layers": 2, "fusion_layers": 2, "num_heads": 2,
             "intermediate_size": 512, "max_positions": 64},
    "base": {"hidden_size": 768, "text_layers": 9, "fusion_layers": 3, "num_heads": 12,
             "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "text_layers": 19, "fusion_layers": 5, "num_heads": 16,
              "intermediate_size": 4096},
}


def build_fusion_text_encoder(text: dict | None, pretrained_path: str, video_dim: int,
                              vocab_ids: Sequence[int] | None = None,
                              mlm_head: bool = True) -> BertTextEncoder:
    """A BERT text + fusion encoder (with an MLM head unless ``mlm_head`` is False), from sizes (``text``) or a local pretrained
    folder (then ``text`` may only set text_layers, fusion_layers and the dropout rates), its
    vocabulary truncated to ``vocab_ids`` when given."""
    text = dict(text or {})
    if pretrained_path:
        fusion = text.pop("fusion_layers", 3)
        encoder = BertTextEncoder.from_pretrained(
            pretrained_path, fusion_layers=fusion, text_layers=text.pop("text_layers", None),
            video_dim=video_dim, mlm_head=mlm_head, dropout=text.pop("dropout", None),
            attention_dropout=text.pop("attention_dropout", None))
        if text:
            raise ValueError(f"text={sorted(text)}: a pretrained text model ({pretrained_path}) "
                             "brings its own sizes; only text_layers, fusion_layers, dropout and "
                             "attention_dropout can be set")
        if vocab_ids:
            encoder.keep_tokens(vocab_ids)
        return encoder
    if vocab_ids:
        text["vocab_size"] = len(vocab_ids)
    return BertTextEncoder(**text, video_dim=video_dim, mlm_head=mlm_head)


class BertMLMHead(nn.Module):
    """BERT's prediction head: dense -> activation -> LayerNorm -> tied word-embedding decoder.

    Parameter names match ``BertLMPredictionHead`` (``transform.dense``, ``transform.LayerNorm``,
    ``decoder.weight`` (the embedding matrix itself), ``bias``).
    """

    def __init__(self, word_embeddings: nn.Embedding, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        from transformers.activations import ACT2FN

        vocab_size, hidden = word_embeddings.weight.shape
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden, hidden)
        self.transform.act = ACT2FN[hidden_act] if isinstance(hidden_act, str) else hidden_act
        self.transform.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: one Parameter, two names
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.transform.dense.weight, std=0.02)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x L x D features -> B x L x V logits."""
        hidden = self.transform.LayerNorm(self.transform.act(self.transform.dense(tokens)))
        return self.decoder(hidden) + self.bias


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, mask_id: int,
                special_ids: Sequence[int] | torch.Tensor, ratio: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick each real, non-special token with probability ``ratio``; of those,
    80% become [MASK], 10% a random non-special token, 10% stay. Returns (masked ids, labels),
    labels holding the original id at picked positions and -100 elsewhere.

    Picks are independent per token (as in BERT), so a short caption can get none; the MLM
    loss must then ignore it (cross-entropy over all -100 labels is undefined).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ in shape")
    device = generator.device if generator is not None else ids.device
    ids_here = ids.to(device)
    special = torch.as_tensor(list(special_ids) if not torch.is_tensor(special_ids)
                              else special_ids, dtype=torch.long, device=device)
    candidates = mask.to(device).bool() & ~torch.isin(ids_here, special)
    picked = (torch.rand(ids.shape, generator=generator, device=device) < ratio) & candidates
    labels = torch.where(picked, ids_here, torch.full_like(ids_here, -100))
    choice = torch.rand(ids.shape, generator=generator, device=device)
    to_mask = picked & (choice < 0.8)
    to_random = picked & (choice >= 0.8) & (choice < 0.9)
    vocabulary = torch.arange(vocab_size, device=device)
    allowed = vocabulary[~torch.isin(vocabulary, special)]
    random_ids = allowed[torch.randint(len(allowed), ids.shape, generator=generator,
                                       device=device)]
    masked = torch.where(to_mask, torch.full_like(ids_here, mask_id), ids_here)
    masked = torch.where(to_random, random_ids, masked)
    return masked.to(ids.device), labels.to(ids.device)


def _check_text(ids: torch.Tensor, mask: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise ValueError(f"text ids and mask must both be B x L, got {tuple(ids.shape)} and "
                         f"{tuple(mask.shape)}")
    if ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"text ids must be integer, got {ids.dtype}")


def _init_like_bert(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorm)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a ``save_pretrained`` folder (safetensors or .bin)."""
    safetensors_file = folder / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    return {}



def pretrained_word_embeddings(folder: str | os.PathLike, width: int | None = None,
                               token_ids: Sequence[int] | None = None) -> torch.Tensor:
    """The word-embedding table of a local BERT folder (rows ``token_ids`` when given), reduced
    to ``width`` columns by PCA when the checkpoint is wider: the table's ``width`` main
    directions keep most of its geometry, for a smaller model whose token table starts from it."""
    folder = Path(folder)
    state = _read_weights(folder)
    key = next((k for k in state if k.endswith("embeddings.word_embeddings.weight")), None)
    if key is None:
        raise FileNotFoundError(f"{folder}: no BERT weights with embeddings.word_embeddings "
                                "(model.safetensors or pytorch_model.bin)")
    table = state[key].float()
    if width is not None and width > table.shape[1]:
        raise ValueError(f"{folder}'s word embeddings are {table.shape[1]} wide; a {width}-wide "
                         "table cannot start from them")
    if width is not None and width < table.shape[1]:
        table = table - table.mean(dim=0)
        _, directions = torch.linalg.eigh(table.t() @ table)  # ascending eigenvalues
        table = table @ directions[:, -width:].flip(1)
    if token_ids is None:
        return table
    index = torch.as_tensor(list(token_ids), dtype=torch.long)
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= table.shape[0]:
        raise ValueError(f"token ids must lie in [0, {table.shape[0]}) for {folder}")
    return table[index]
