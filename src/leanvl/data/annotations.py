"""Annotation records: loading, validation and writing (JSON list or JSONL).

Formats (one record per clip or per item; ``start``/``end`` in seconds are optional):

- ``retrieval`` (also pre-training): ``{"video": path, "caption": str | [str]}``
- ``qa``: ``{"video": path, "question": str, "answer": str}``
- ``mc``: ``{"video": path, "caption": [option, ...], "answer": int}``
- ``classification``: ``{"video": path, "label": str | int}``
- ``image``: ``{"image": path, "caption": str | [str]}``

Retrieval and image records may add ``"negative_caption": str | [str]``: captions known to be
false for the clip (e.g. those of its time reversal), used in training as hard negatives; and
video records ``"reversal_negative": bool``: true when the clip played backwards contradicts its
captions, so that training may use the reversed clip as a hard negative.
Extra keys are kept untouched, so converters and the synthetic benchmark may add metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KINDS = ("retrieval", "qa", "mc", "classification", "image")


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names the file, record and field."""

    def __init__(self, path: str | os.PathLike, message: str, index: int | None = None,
                 field: str | None = None):
        self.path, self.index, self.field, self.message = str(path), index, field, message
        where = self.path
        if index is not None:
            where += f": record {index}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


def infer_kind(record: dict[str, Any]) -> str:
    """Guess the record kind from its keys (see the module docstring)."""
    if "image" in record:
        return "image"
    if "question" in record:
        return "qa"
    if "label" in record:
        return "classification"
    if isinstance(record.get("caption"), list) and isinstance(record.get("answer"), int) \
            and not isinstance(record.get("answer"), bool):
        return "mc"
    return "retrieval"


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def validate_record(record: Any, kind: str | None = None, path: str = "<memory>",
                    index: int | None = None) -> str:
    """Check one record; return its kind or raise AnnotationError naming the field."""
    def fail(field: str | None, message: str):
        raise AnnotationError(path, message, index=index, field=field)

    if not isinstance(record, dict):
        fail(None, f"expected an object, got {type(record).__name__}")
    kind = kind or infer_kind(record)
    if kind not in KINDS:
        fail(None, f"unknown annotation kind {kind!r}; expected one of {', '.join(KINDS)}")
    media = "image" if kind == "image" else "video"
    if media not in record:
        fail(media, "missing")
    if not _is_text(record[media]):
        fail(media, f"must be a non-empty path string, got {record[media]!r}")
    if kind in ("retrieval", "image"):
        caption = record.get("caption")
        if caption is None:
            fail("caption", "missing")
        if isinstance(caption, list):
            if not caption or not all(_is_text(c) for c in caption):
                fail("caption", "must be a non-empty list of non-empty strings")
        elif not _is_text(caption):
            fail("caption", f"must be a non-empty string or a list of strings, got {caption!r}")
        negative = record.get("negative_caption")
        if negative is not None and not (_is_text(negative) or (
                isinstance(negative, list) and negative and all(_is_text(c) for c in negative))):
            fail("negative_caption", "must be a non-empty string or a non-empty list of "
                 f"non-empty strings, got {negative!r}")
        reversal = record.get("reversal_negative")
        if reversal is not None and not isinstance(reversal, bool):
            fail("reversal_negative", f"must be true or false, got {reversal!r}")
    elif kind == "qa":
        for field in ("question", "answer"):
            if field not in record:
                fail(field, "missing")
            if not _is_text(record[field]):
                fail(field, f"must be a non-empty string, got {record[field]!r}")
    elif kind == "mc":
        options = record.get("caption")
        if not isinstance(options, list) or len(options) < 2 \
                or not all(_is_text(o) for o in options):
            fail("caption", "must be a list of at least 2 non-empty option strings")
        answer = record.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            fail("answer", f"must be an integer option index, got {answer!r}")
        if not 0 <= answer < len(options):
            fail("answer", f"index {answer} out of range for {len(options)} options")
    elif kind == "classification":
        label = record.get("label")
        if label is None:
            fail("label", "missing")
        if not (_is_text(label) or (isinstance(label, int) and not isinstance(label, bool))):
            fail("label", f"must be a class name or an integer, got {label!r}")
    for field in ("start", "end"):
        value = record.get(field)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            fail(field, f"must be a non-negative number of seconds, got {value!r}")
    if record.get("start") is not None and record.get("end") is not None \
            and record["end"] <= record["start"]:
        fail("end", f"must be after start ({record['start']}), got {record['end']}")
    return kind


def read_records(path: str | os.PathLike) -> list[Any]:
    """Parse a JSON list or JSONL file into raw records, naming the file and line on errors."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "annotation file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise AnnotationError(path, f"line {line_no}: invalid JSON ({error.msg})",
                                      index=len(records)) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(path, f"invalid JSON at line {error.lineno} ({error.msg})") from None
    if not isinstance(data, list):
        raise AnnotationError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def load_annotations(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Load and validate every record of an annotation file (all of one ``kind`` if given)."""
    records = read_records(path)
    for index, record in enumerate(records):
        validate_record(record, kind=kind, path=str(path), index=index)
    return records


def check_records(path: str | os.PathLike, kind: str | None = None
                  ) -> tuple[list[tuple[int, dict]], list[AnnotationError]]:
    """Validate every record without stopping at the first bad one: (good, errors)."""
    good, errors = [], []
    for index, record in enumerate(read_records(path)):
        try:
            validate_record(record, kind=kind, path=str(path), index=index)
            good.append((index, record))
        except AnnotationError as error:
            errors.append(error)
    return good, errors


def captions_of(record: dict[str, Any], field: str = "caption") -> list[str]:
    """The captions of a retrieval/image record as a list (``field="negative_caption"``: its
    hard-negative captions, empty when it has none)."""
    caption = record.get(field) if field != "caption" else record["caption"]
    if caption is None:
        return []
    return list(caption) if isinstance(caption, list) else [caption]


def corpus_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a vocabulary corpus (``data.vocab_corpus``): a ``.txt`` file gives one text
    per non-empty line; an annotation file gives its records' captions (multiple-choice options,
    hard-negative captions) and each question with its answer."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise AnnotationError(path, "vocabulary corpus not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        texts = [line.strip() for line in lines if line.strip()]
    else:
        texts = []
        for record in load_annotations(path):
            if "question" in record:
                texts += [str(record["question"]), str(record["answer"])]
            elif "caption" in record:
                texts += captions_of(record)
            texts += captions_of(record, "negative_caption")
    if not texts:
        raise AnnotationError(path, "no texts to count for the vocabulary (captions, questions "
                                    "and answers, or lines of a .txt file)")
    return texts


def media_path(record: dict[str, Any], root: str | os.PathLike | None = None) -> Path:
    """The record's video (or image) path, joined to ``root`` when relative."""
    name = record["image"] if "image" in record else record["video"]
    path = Path(name)
    return path if path.is_absolute() or root is None else Path(root) / path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_annotations(records: Iterable[dict[str, Any]], path: str | os.PathLike,
                      kind: str | None = None) -> Path:
    """Validate and write records as JSONL (``.jsonl``) or a JSON list (anything else)."""
    records = list(records)
    for index, record in enumerate(records):
        validate_record(record, kind=kind, path=str(path), index=index)
    path = Path(path)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    atomic_write_text(path, text)
    return path


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts used by `leanvl data synth` and `leanvl data check`: records, videos, captions."""
    kinds: dict[str, int] = {}
    for record in records:
        kinds[infer_kind(record)] = kinds.get(infer_kind(record), 0) + 1
    videos = {r.get("video", r.get("image")) for r in records}
    captions = sum(len(captions_of(r)) for r in records if infer_kind(r) in ("retrieval", "image"))
    return {"records": len(records), "media": len(videos), "captions": captions, "kinds": kinds}
