"""Reading weight files and converting published checkpoints to leanvl's module names.

Plain functions behind ``leanvl convert``; each takes a state dict (or a loaded checkpoint
object with the weights under ``model`` / ``module`` / ``state_dict``) and returns state dicts
that ``load_state_dict(strict=True)`` accepts.

Module layouts the converted weights are meant for:

- ``convert_umt_pretrain`` (UMT stage 1: ``encoder.*`` + ``clip_decoder.{i}.{head,norm}``)
  returns ``(student, uta_heads)``: ``student`` loads into ``VideoViT.from_size("b16")`` (or
  ``"l16"``), ``uta_heads`` into ``nn.ModuleList([AlignmentHead(768, 512) for _ in range(6)])``.
  In a UMT model, name them so the mapping stays obvious: ``video_encoder`` = the VideoViT and
  ``uta_heads`` = the ModuleList, i.e. ``encoder.X -> video_encoder.X`` and
  ``clip_decoder.i.{head,norm} -> uta_heads.i.{head,norm}``. Head i aligns student block
  ``depth - K + i`` (after the shared final ``norm``) with teacher block ``L - K + i``.
- ``convert_umt_finetune`` (UMT action classifiers: no final ``norm``, ``fc_norm``, ``head``)
  returns ``(student, classifier)``: ``VideoViT(..., final_norm=False)`` and
  ``PooledClassifier(768, num_classes)`` (``fc_norm -> norm``, ``head -> head``). Classifiers
  fine-tuned at another grid than 8 x 14 x 14 (16 frames, 384 px) store their position table as
  ``pos_embed``; it stays in ``student`` for ``VideoViT(stored_table=True, table_frames=t,
  table_patches=p)``, with (t, p) from ``stored_table_grid``.
- ``convert_umt_stage2`` (UMT vision-language checkpoints, pre-training or fine-tuned) returns
  the state of a stage-2 ``UMT`` built with ``umt_stage2_kwargs`` of the same state.
- ``convert_openai_clip_visual`` / ``convert_timm_clip_visual`` return a state dict for
  ``CLIPVisionTeacher`` (OpenAI CLIP's visual names, 2-D ``conv1``).
- ``convert_perceiver_vl`` (the Perceiver-VL authors' Lightning checkpoint) returns the state of
  ``perceiver_vl_b32(variant="official")`` and the size kwargs read from its shapes;
  ``load_tensors_only`` reads such a checkpoint without running code from it.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

#: keys under which training scripts commonly nest the weights, tried in order
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "model_state_dict")


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the module; the message names it."""


def load_checkpoint_file(path: str | Path, allow_pickle: bool = False) -> Any:
    """Read .safetensors, TorchScript archives (OpenAI CLIP's .pt) or torch.save files on CPU.

    torch.save files are read with ``weights_only=True``; ``argparse.Namespace`` (which UMT
    and DeiT-style scripts store next to the weights) is allowed. Anything else needs
    ``allow_pickle=True``, which runs arbitrary code from the file: only for trusted files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("constants.pkl") for name in archive.namelist())
        if scripted:
            # OpenAI's released CLIP .pt files are TorchScript modules, not pickled dicts;
            # torch.jit is deprecated but still the only reader of these files.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: not loadable with weights_only=True ({str(error).splitlines()[0]}); "
                "pass allow_pickle=True only if you trust this file") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def unwrap_state_dict(checkpoint: Any) -> StateDict:
    """The flat name -> tensor dict inside a checkpoint (under ``model``, ``module``, ...)."""
    state = checkpoint
    while isinstance(state, Mapping) and not _is_flat(state):
        inner = next((state[key] for key in WRAPPER_KEYS if key in state), None)
        if inner is None:
            raise CheckpointError(f"no state dict found; top-level keys: {sorted(state)[:20]}")
        state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict, got {type(state).__name__}")
    state = dict(state)
    # DistributedDataParallel prefixes every name with "module.".
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _is_flat(state: Mapping) -> bool:
    return bool(state) and all(isinstance(value, torch.Tensor) for value in state.values())


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor],
                           source: str = "state dict", assign: bool = False) -> None:
    """Strict ``load_state_dict`` whose error lists all missing/unexpected keys and the source
    (``assign``: take the tensors themselves, e.g. into a module on the meta device)."""
    result = module.load_state_dict(state, strict=False, assign=assign)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys ({len(result.missing_keys)}): "
                        + ", ".join(result.missing_keys))
    if result.unexpected_keys:
        problems.append(f"unexpected keys ({len(result.unexpected_keys)}): "
                        + ", ".join(result.unexpected_keys))
    if problems:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: "
                              + "; ".join(problems))


def _is_sincos(value: torch.Tensor) -> bool:
    """Whether a stored table is the plain 1-D sine-cosine table over its positions."""
    from leanvl.nn.vit import sincos_table

    table = value.reshape(-1, value.shape[-1]).float()
    return torch.allclose(table, sincos_table(table.shape[0], table.shape[1]), atol=1e-4)


def _check_sincos_buffer(name: str, value: torch.Tensor) -> None:
    """Accept a stored ``pos_embed`` only if it is the fixed table VideoViT recomputes."""
    if not _is_sincos(value):
        raise CheckpointError(f"'{name}' is a learned position embedding; VideoViT only "
                              "supports the fixed sine-cosine table")


def convert_umt_pretrain(state_dict: Mapping[str, Any]) -> tuple[StateDict, StateDict]:
    """UMT stage-1 checkpoint -> (VideoViT state, ModuleList-of-AlignmentHead state)."""
    state = unwrap_state_dict(state_dict)
    student: StateDict = {}
    heads: StateDict = {}
    unknown = []
    for key, value in state.items():
        if key == "encoder.pos_embed":
            _check_sincos_buffer(key, value)
        elif key.startswith("encoder."):
            student[key[len("encoder."):]] = value
        elif re.match(r"clip_decoder\.\d+\.(head|norm)\.(weight|bias)$", key):
            heads[key[len("clip_decoder."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in a UMT pre-training checkpoint: {unknown}")
    if not student:
        raise CheckpointError("no 'encoder.*' keys: not a UMT pre-training checkpoint")
    return student, heads


def convert_umt_finetune(state_dict: Mapping[str, Any]) -> tuple[StateDict, StateDict]:
    """UMT action-classification checkpoint -> (VideoViT state, PooledClassifier state); a
    stored position table other than the plain 1-D one stays as ``pos_embed`` (1 x N x D)."""
    state = unwrap_state_dict(state_dict)
    student: StateDict = {}
    classifier: StateDict = {}
    for key, value in state.items():
        if key == "pos_embed":
            if not _is_sincos(value):  # 16 frames / 384 px: the authors' resampled table
                student[key] = value.reshape(1, -1, value.shape[-1])
        elif key.startswith("fc_norm."):
            classifier["norm." + key[len("fc_norm."):]] = value
        elif key.startswith("head."):
            classifier[key] = value
        else:
            student[key] = value
    if not classifier:
        raise CheckpointError("no 'fc_norm.*' / 'head.*' keys: not a UMT fine-tuned classifier")
    return student, classifier


def _squeeze_patch_conv(state: StateDict, key: str) -> None:
    weight = state.get(key)
    if weight is None or weight.dim() == 4:
        return
    if weight.dim() == 5 and weight.shape[2] == 1:
        # UMT inflates CLIP's patch conv to 1 x p x p; with one frame it is the same 2-D conv.
        state[key] = weight[:, :, 0]
        return
    raise CheckpointError(f"'{key}' has shape {tuple(weight.shape)}; a frame-by-frame CLIP "
                          "teacher needs a 2-D conv or a 3-D one with temporal size 1")


def convert_openai_clip_visual(state_dict: Mapping[str, Any]) -> StateDict:
    """OpenAI CLIP weights (visual tower, or a full model with ``visual.``) -> teacher state."""
    state = unwrap_state_dict(state_dict)
    if any(key.startswith("visual.") for key in state):
        # A full CLIP model: keep the image tower, drop the text tower (whose names overlap,
        # e.g. ``positional_embedding`` and ``transformer.resblocks``).
        state = {key[len("visual."):]: value for key, value in state.items()
                 if key.startswith("visual.")}
    state = dict(state)
    _squeeze_patch_conv(state, "conv1.weight")
    return state


_TIMM_TO_OPENAI = [
    (r"^patch_embed\.proj\.weight$", "conv1.weight"),
    (r"^norm_pre\.", "ln_pre."),
    (r"^norm\.", "ln_post."),
    (r"^blocks\.(\d+)\.norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"transformer.resblocks.\1.attn.in_proj_weight"),
    (r"^blocks\.(\d+)\.attn\.qkv\.bias$", r"transformer.resblocks.\1.attn.in_proj_bias"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
]


def is_timm_clip_naming(state: Mapping[str, Any]) -> bool:
    """True for timm's ViT names (``cls_token``, ``blocks.N``), False for OpenAI's."""
    return "cls_token" in state or any(key.startswith("blocks.") for key in state)


def _rename(key: str, table: Sequence[tuple[str, str]]) -> str | None:
    """``key`` renamed by the first (regex, replacement) of ``table`` that matches it; None when
    none does."""
    for pattern, replacement in table:
        new, hits = re.subn(pattern, replacement, key)
        if hits:
            return new
    return None


def convert_timm_clip_visual(state_dict: Mapping[str, Any]) -> StateDict:
    """timm ``vit_*_clip_*`` weights -> teacher state (OpenAI names; ``head`` becomes ``proj``)."""
    state = unwrap_state_dict(state_dict)
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        if key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.reshape(-1, value.shape[-1])
        elif key == "head.weight":
            out["proj"] = value.t().contiguous()
        elif key in ("head.bias", "patch_embed.proj.bias"):
            # timm adds these as zeros when it converts OpenAI weights; CLIP has neither.
            if bool(value.count_nonzero()):
                raise CheckpointError(f"'{key}' is non-zero; CLIP's visual tower has no such bias")
        elif (new := _rename(key, _TIMM_TO_OPENAI)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"timm keys with no CLIP equivalent: {unknown}")
    _squeeze_patch_conv(out, "conv1.weight")
    return out


def convert_clip_visual(state_dict: Mapping[str, Any]) -> StateDict:
    """Either naming (OpenAI or timm) -> teacher state, detected from the keys."""
    state = unwrap_state_dict(state_dict)
    if is_timm_clip_naming(state):
        return convert_timm_clip_visual(state)
    return convert_openai_clip_visual(state)


# ---- Perceiver-VL (the authors' Lightning checkpoint) ----------------------------------------
#: authors' names -> leanvl's (variant="official"), for tensors that map one to one; the rest
#: (split, merged, folded or unused tensors) are handled in ``convert_perceiver_vl``
_PERCEIVER_VL_RENAMES = [
    (r"^transformer\.patch_embed\.proj\.", "embed.patch_embed.proj."),
    (r"^transformer\.latents$", "latents.latents"),
    (r"^transformer\.crossatt_blocks_visual\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2|attn\.q|"
     r"attn\.proj)\.", r"encoder.cross.\1.\2."),
    (r"^transformer\.decoder_block_text\.0\.(norm1|norm2|mlp\.fc1|mlp\.fc2|attn\.q|attn\.proj)\.",
     r"decoder.\1."),
    (r"^transformer\.blocks\.(\d+)\.", r"encoder.self_layers.\1."),
    (r"^transformer\.mlm_pos\.weight$", "query_pos"),
    (r"^transformer\.co_norm\.", "encoder.context_norm."),
    (r"^transformer\.norm\.", "encoder.norm."),
    (r"^transformer\.decoder_norm\.", "decoder_norm."),
    (r"^text_embeddings\.word_embeddings\.weight$", "embed.token_embed.weight"),
    (r"^text_embeddings\.position_embeddings\.weight$", "embed.text_pos"),
    (r"^text_embeddings\.LayerNorm\.", "embed.text_norm."),
    (r"^mlm_score\.bias$", "mlm_head.bias"),
    (r"^mlm_score\.transform\.dense\.", "mlm_head.transform.dense."),
    (r"^mlm_score\.transform\.LayerNorm\.", "mlm_head.transform.norm."),
    (r"^mlm_score\.decoder\.weight$", "mlm_head.decoder.weight"),
    (r"^matching_score\.pooler\.dense\.", "vtm_head.dense."),
    (r"^matching_score\.fc\.", "vtm_head.fc."),
]
#: tensors the authors' forward never reads (the Lightning module builds them anyway)
PERCEIVER_VL_UNUSED = ("token_type_embeddings.weight", "text_embeddings.position_ids")


def convert_perceiver_vl(state_dict: Mapping[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """The authors' Perceiver-VL checkpoint (``perceivervl_mlm_itm_vtm.ckpt``, weights under
    ``state_dict``) -> (state for ``PerceiverVL(variant="official")``, its shape kwargs).

    Besides renaming: k and v merge into ``kv``; the per-frame [CLS] and its position row sum
    into ``embed.frame_cls``; BERT's token-type row 0 becomes ``embed.text_type``; the decoder's
    query is row 0 of ``cls_token_decoder`` (the only one the forward reads); the mask-type rows
    swap (the authors' type 0 marks a predicted token, leanvl's ``query_mask_embed`` row 1).
    ``PERCEIVER_VL_UNUSED``, BERT's token-type row 1 and rows 1.. of ``cls_token_decoder`` are
    never read by the authors' forward and are dropped.
    """
    state = unwrap_state_dict(state_dict)
    special = ("transformer.cls_token", "transformer.pos_embed", "transformer.cls_token_decoder",
               "transformer.temporal_embed", "transformer.mlm_type.weight",
               "text_embeddings.token_type_embeddings.weight")
    absent = [key for key in special + ("transformer.latents", "transformer.blocks.0.mlp.fc1.weight",
                                        "transformer.patch_embed.proj.weight",
                                        "text_embeddings.word_embeddings.weight",
                                        "text_embeddings.position_embeddings.weight")
              if key not in state]
    if absent:
        raise CheckpointError(f"not a Perceiver-VL pre-training checkpoint: missing {absent}")
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        if key in special or key in PERCEIVER_VL_UNUSED:
            continue
        merged = re.match(r"^transformer\.(crossatt_blocks_visual\.(\d+)|decoder_block_text\.0)"
                          r"\.attn\.([kv])\.(weight|bias)$", key)
        if merged:
            if merged.group(3) == "k":  # k and v stack into kv (k first), at k's turn
                target = (f"encoder.cross.{merged.group(2)}" if merged.group(2) is not None
                          else "decoder")
                partner = key.replace(".attn.k.", ".attn.v.")
                if partner not in state:
                    raise CheckpointError(f"{key} has no {partner}")
                out[f"{target}.attn.kv.{merged.group(4)}"] = torch.cat([value, state[partner]])
            continue
        if (new := _rename(key, _PERCEIVER_VL_RENAMES)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys with no place in Perceiver-VL (variant=official): {unknown} "
                              "(a fine-tuned checkpoint's task heads are not supported)")
    position = state["transformer.pos_embed"]
    out["embed.frame_cls"] = state["transformer.cls_token"].reshape(1, -1) + position[0, :1]
    out["embed.video_pos"] = position[:, 1:]
    out["embed.temporal_embed"] = state["transformer.temporal_embed"].reshape(
        -1, position.shape[-1])
    out["embed.text_type"] = state["text_embeddings.token_type_embeddings.weight"][0]
    out["query_cls"] = state["transformer.cls_token_decoder"][0, :1]
    out["query_mask_embed.weight"] = state["transformer.mlm_type.weight"].flip(0)
    out["encoder.layer_drop_calls"] = torch.zeros((), dtype=torch.long)
    return out, _perceiver_vl_shape(state)


def _perceiver_vl_shape(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``PerceiverVL`` kwargs that give the checkpoint's shapes."""
    dim = int(state["transformer.latents"].shape[1])
    patch = int(state["transformer.patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["transformer.pos_embed"].shape[1]) - 1)
    cross = len({k.split(".")[2] for k in state if k.startswith("transformer.crossatt_blocks")})
    depth = len({k.split(".")[2] for k in state if k.startswith("transformer.blocks.")})
    if not cross or depth % cross:
        raise CheckpointError(f"{depth} self-attention blocks do not split evenly over {cross} "
                              "cross-attentions")
    return {"dim": dim, "num_heads": max(1, dim // 64),
            "mlp_dim": int(state["transformer.blocks.0.mlp.fc1.weight"].shape[0]),
            "num_latents": int(state["transformer.latents"].shape[0]),
            "num_blocks": cross, "self_per_block": depth // cross, "patch_size": patch,
            "image_size": grid * patch,
            "max_frames": int(state["transformer.temporal_embed"].shape[1]),
            "vocab_size": int(state["text_embeddings.word_embeddings.weight"].shape[0]),
            "max_text_len": int(state["text_embeddings.position_embeddings.weight"].shape[0])}


class _InertObject(dict):
    """Stands in for an object of a class that a checkpoint names but ``load_tensors_only``
    does not trust: it accepts whatever the unpickler hands it and runs nothing."""

    __hash__ = object.__hash__

    def __new__(cls, *args: Any, **kwargs: Any) -> _InertObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        """List-style pickles append items; they are dropped."""

    def extend(self, items: Any) -> None:
        """List-style pickles extend with items; they are dropped."""


def _trusted_globals() -> dict[str, Any]:
    """The globals torch's ``weights_only`` loader accepts (tensor rebuilders, dtypes, plain
    containers), by ``module.name``."""
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for item in torch.serialization.get_safe_globals():
        if not isinstance(item, tuple):
            allowed[f"{item.__module__}.{item.__qualname__}"] = item
    return allowed


class _TensorsOnlyPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only trusted globals and
    turns every other one into an inert placeholder class."""

    class Unpickler(pickle.Unpickler):
        """Resolves trusted globals; every other name becomes an ``_InertObject`` subclass."""

        trusted: dict[str, Any] = {}
        placeholders: dict[str, type] = {}

        def find_class(self, module: str, name: str) -> Any:
            """The trusted object, or a placeholder class named after the untrusted one."""
            key = f"{module}.{name}"
            if key in self.trusted:
                return self.trusted[key]
            if key not in self.placeholders:
                self.placeholders[key] = type(name, (_InertObject,), {"__module__": module})
            return self.placeholders[key]

    load = staticmethod(pickle.load)


def load_tensors_only(path: str | Path) -> Any:
    """A torch.save file (e.g. a PyTorch Lightning checkpoint) read without running code from
    it: tensors and plain containers come back as saved; objects of any other class (training
    callbacks, hyper-parameter containers, ...) become empty placeholders. For files that
    ``weights_only=True`` refuses only because of such objects next to the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_checkpoint_file(path)
    _TensorsOnlyPickle.Unpickler.trusted = _trusted_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_TensorsOnlyPickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable torch.save file ({error})") from None


#: the grid UMT's classifiers build their table for before resampling it (8 frames, 14 x 14)
UMT_TABLE_GRID = (8, 14, 14)


def authors_position_table(grid: tuple[int, int, int], dim: int,
                           base: tuple[int, int, int] = UMT_TABLE_GRID) -> torch.Tensor:
    """UMT's classifier table for a (t, h, w) grid: the 1-D table over ``base``, resampled
    bicubically in space and linearly in time (``VideoViT``'s ``table_frames`` mode)."""
    from leanvl.nn.vit import resample_position_table, sincos_table

    table = sincos_table(base[0] * base[1] * base[2], dim)
    return table[None] if tuple(grid) == tuple(base) else \
        resample_position_table(table, base, grid)


def stored_table_grid(table: torch.Tensor, frames: int | None = None) -> tuple[int, int, int]:
    """The (t, h, w) token grid of a stored UMT position table (square grids).

    With ``frames`` given, h = w = sqrt(N / frames). Otherwise the grid whose authors' table
    (``authors_position_table``) equals the stored one: the authors add the table detached,
    so fine-tuning leaves it as built. Raises when neither decides.
    """
    table = table.reshape(-1, table.shape[-1]).float()
    count, dim = table.shape
    if frames:
        side = round((count / frames) ** 0.5)
        if frames * side * side != count:
            raise CheckpointError(f"a position table of {count} tokens is not {frames} frames "
                                  "of a square grid")
        return frames, side, side
    candidates = [(t, round((count // t) ** 0.5)) for t in range(1, count + 1)
                  if count % t == 0 and round((count // t) ** 0.5) ** 2 == count // t]
    for t, side in candidates:
        if side < 2 or t > 256:
            continue
        expected = authors_position_table((t, side, side), dim)[0]
        if torch.allclose(table, expected, atol=1e-3):
            return t, side, side
    options = ", ".join(f"{t}x{side}x{side}" for t, side in candidates if t <= 256)
    raise CheckpointError(f"cannot tell the frames of a stored position table of {count} tokens "
                          f"(it is not the authors' table for any of {options}): give the "
                          "frames it was fine-tuned with")


def _bert_names(key: str) -> str | None:
    """A text-side key of a UMT checkpoint (after ``text_encoder.``) in BertTextEncoder's
    names; None for keys handled elsewhere (the tied MLM decoder)."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.startswith(("embeddings.", "encoder.layer.")):
        return key
    if key.startswith("cls.predictions.transform."):
        return "mlm_head." + key[len("cls.predictions."):]
    if key == "cls.predictions.bias":
        return "mlm_head.bias"
    return None
def convert_umt_stage2(state_dict: Mapping[str, Any]) -> StateDict:
    """UMT vision-language checkpoint (``multi_modality``: pre-training with ``text_encoder.
    bert.*`` + ``text_encoder.cls.*``, or fine-tuned with ``text_encoder.*``) -> the state of
    a stage-2 ``UMT`` (see ``umt_stage2_kwargs``).

    ``vision_encoder.encoder.*`` -> ``video_encoder.*``, ``vision_encoder.clip_decoder.i`` ->
    ``uta_heads.i``, ``vision_encoder.pool_norm`` -> ``pool_norm``, ``text_encoder.[bert.]*`` ->
    ``text_encoder.*``, ``cls.predictions.{transform,bias}`` -> ``text_encoder.mlm_head.*`` (its
    decoder is tied to the word embeddings, as in BERT: checked, not stored; so is xbert's
    ``position_ids`` buffer), ``temp`` ->
    ``log_temperature`` (its log); ``vision_proj``, ``text_proj``, ``itm_head`` keep their names.
    """
    state = unwrap_state_dict(state_dict)
    out: StateDict = {}
    unknown, tied = [], {}
    for key, value in state.items():
        if key.startswith("vision_encoder.encoder."):
            name = key[len("vision_encoder.encoder."):]
            if name == "pos_embed":
                _check_sincos_buffer(key, value)
            else:
                out["video_encoder." + name] = value
        elif re.match(r"vision_encoder\.clip_decoder\.\d+\.(head|norm)\.(weight|bias)$", key):
            out["uta_heads." + key[len("vision_encoder.clip_decoder."):]] = value
        elif key.startswith("vision_encoder.pool_norm."):
            out[key[len("vision_encoder."):]] = value
        elif key.startswith("text_encoder."):
            inner = key[len("text_encoder."):]
            name = _bert_names(inner)
            if inner.endswith("embeddings.position_ids"):  # xbert's buffer: 0, 1, 2, ...
                if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                    raise CheckpointError(f"'{key}' is not 0, 1, 2, ...; BERT's positions are")
            elif name is not None:
                out["text_encoder." + name] = value
            elif inner in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
                tied[inner] = value
            else:
                unknown.append(key)
        elif key == "temp":
            out["log_temperature"] = value.float().reshape(()).log()
        elif re.match(r"(vision_proj|text_proj|itm_head)\.(weight|bias)$", key):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in a UMT vision-language checkpoint: {unknown}")
    if not any(key.startswith("video_encoder.") for key in out) or "itm_head.weight" not in out:
        raise CheckpointError("no 'vision_encoder.encoder.*' or 'itm_head' keys: not a UMT "
                              "vision-language (multi_modality) checkpoint")
    embeddings = out.get("text_encoder.embeddings.word_embeddings.weight")
    pairs = (("cls.predictions.decoder.weight", embeddings),
             ("cls.predictions.decoder.bias", out.get("text_encoder.mlm_head.bias")))
    for name, own in pairs:
        if name in tied and (own is None or not torch.equal(tied[name], own)):
            raise CheckpointError(f"'text_encoder.{name}' is not tied to the word embeddings / "
                                  "the MLM bias as in BERT; leanvl's MLM head ties them")
    return out


def umt_stage2_kwargs(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``UMT`` keyword arguments (stage 2, ``vision``/``text`` sizes, heads) that fit a state
    from ``convert_umt_stage2``: sizes are read from the shapes; heads are width / 64, as in
    ViT-B/L and BERT-base/large."""
    def count(pattern: str) -> int:
        return len({m.group(1) for key in state if (m := re.match(pattern, key))})

    dim = int(state["video_encoder.patch_embed.proj.weight"].shape[0])
    patch = int(state["video_encoder.patch_embed.proj.weight"].shape[-1])
    tubelet = int(state["video_encoder.patch_embed.proj.weight"].shape[2])
    vision = {"dim": dim, "depth": count(r"video_encoder\.blocks\.(\d+)\."),
              "num_heads": max(1, dim // 64),
              "mlp_dim": int(state["video_encoder.blocks.0.mlp.fc1.weight"].shape[0]),
              "patch_size": patch, "tubelet_size": tubelet, "drop_path_rate": 0.0}
    words = state["text_encoder.embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    layers = count(r"text_encoder\.encoder\.layer\.(\d+)\.")
    fusion = count(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.")
    text = {"vocab_size": int(words.shape[0]), "hidden_size": hidden,
            "text_layers": layers - fusion, "fusion_layers": fusion,
            "num_heads": max(1, hidden // 64),
            "intermediate_size": int(
                state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "max_positions": int(
                state["text_encoder.embeddings.position_embeddings.weight"].shape[0])}
    return {"stage": 2, "vision": vision, "text": text,
            "embed_dim": int(state["vision_proj.weight"].shape[0]),
            "uta_layers": count(r"uta_heads\.(\d+)\."),
            "pool_norm": "pool_norm.weight" in state,
            "itm_logits": int(state["itm_head.weight"].shape[0]),
            "mlm_head": "text_encoder.mlm_head.bias" in state,
            "keep_temporal": True, "mask_type": "none"}
