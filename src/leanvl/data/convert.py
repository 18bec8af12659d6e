"""Converters from the public benchmarks' own annotation files to leanvl's record formats.

Every converter is a function returning a list of records (see `leanvl.data.annotations`),
registered in `CONVERTERS` with a description of its inputs and options, so that the CLI
(`leanvl data convert NAME --<input> PATH ... --out FILE`) is built from the registry alone.
`convert(name, out, **arguments)` runs one, validates and writes the records (JSONL when
``out`` ends in ``.jsonl``, else a JSON list), writes its side file next to the output and
returns a summary. Video paths are relative file names rendered from ``video_template``.

Converters (name: inputs -> records; options with defaults):

- ``msrvtt`` (retrieval), MSRVTT. Either ``data_json`` (``MSRVTT_data.json``: keys
  ``videos`` [{video_id, category, url, "start time", "end time", split, id}] and
  ``sentences`` [{caption, video_id, sen_id}]) with optional ``split_csv``
  (``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``, a ``video_id`` column) -> one record
  per video with the list of all its captions; or ``test_csv`` (the 1k-A
  ``MSRVTT_JSFUSION_test.csv``, columns ``key,vid_key,video_id,sentence``) -> one record per
  video with its sentence. Options: ``split`` (filter ``data_json`` by its own split field:
  train / validate / test), ``video_template="{video_id}.mp4"``.
- ``didemo`` (retrieval), DiDeMo. ``data_json``: ``train_data.json`` / ``val_data.json`` /
  ``test_data.json`` (list of {video, times: [[first, last], ...] in 5-second segment indices
  per annotator, description, annotation_id, ...}). ``mode="paragraph"``: one record per
  video whose caption is all its descriptions space-joined in order of their segments;
  ``mode="segment"``: one record per description with ``start``/``end`` seconds of its
  consensus (most annotated) segment span, segment i covering [5i, 5i + 5).
  ``video_template="{stem}.mp4"`` (``{name}`` is the original file name, ``{stem}`` it
  without its extension, whatever that was: .mov, .mp4, .avi, .m4v, ...).
- ``msvd_qa`` (qa), MSVD-QA. ``qa_json`` (``train_qa.json`` / ``val_qa.json`` /
  ``test_qa.json``: list of {answer, id, question, video_id: int}) and ``mapping``
  (``youtube_mapping.txt``, lines ``<youtube clip name> vid<N>``). Optional ``train_qa``:
  the training QA file the answer vocabulary is built from (default: ``qa_json``).
  Options: ``video_template="{name}.avi"`` (fields ``{name}``, ``{vid}``, ``{video_id}``),
  ``top_k=1000``: ``answers.json`` next to the output lists the ``top_k`` most frequent
  training answers, most frequent first (0 writes none).
- ``msrvtt_mc`` (mc), MSRVTT multiple choice. ``mc_csv``: ``MSR_MC_test.csv``,
  tab-separated, columns ``key vid_key video_id a1 a2 a3 a4 a5 answer`` (answer an index
  0..4) -> ``{"video", "caption": [a1..a5], "answer": int}``.
  ``video_template="{video_id}.mp4"``.
- ``webvid`` (retrieval), WebVid-2M / 10M. ``csv_file``: ``results_2M_train.csv`` style, columns
  ``videoid,contentUrl,duration,page_dir,name`` -> ``{"video", "caption": name}``; rows with
  an empty caption or id are skipped and counted. ``video_template="{page_dir}/{videoid}.mp4"``
  (any CSV column is a field).
- ``kinetics`` (classification), Kinetics-400/600/700. ``csv_file``: columns
  ``label,youtube_id,time_start,time_end,split`` (optional ``is_cc``; times may be floats)
  -> ``{"video", "label"}``. Options: ``split`` (keep rows of this split only),
  ``video_template="{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"`` (the usual download
  script's naming; fields ``youtube_id``, ``time_start``/``time_end`` as whole seconds,
  ``label``, ``split``). ``classes.json`` next to the output lists the sorted class names.

Errors name their source: a missing file raises FileNotFoundError with its path, a missing
column or key a `ConversionError` (a ValueError) naming the file and column, a malformed row
one naming the file and line (CSV/text) or item index (JSON). Rows the benchmarks are known to
hold dirty (empty captions, descriptions, questions) are skipped and counted by reason in the
summary. A conversion that yields no record is an error naming its inputs.
"""

from __future__ import annotations

import csv
import difflib
import errno
import json
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from leanvl.data.annotations import atomic_write_text, write_annotations

DIDEMO_SEGMENT_SECONDS = 5
MSRVTT_SPLITS = ("train", "validate", "test")
DIDEMO_MODES = ("paragraph", "segment")
MSVD_TOP_K = 1000


class ConversionError(ValueError):
    """A source annotation file that cannot be converted; names the file, line/item and field."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None,
                 item: int | None = None, column: str | None = None, key: str | None = None):
        self.path, self.line, self.item = str(path), line, item
        self.field = column if column is not None else key
        where = self.path
        if line is not None:
            where += f": line {line}"
        if item is not None:
            where += f": item {item}"
        if column is not None:
            where += f": column '{column}'"
        if key is not None:
            where += f": key '{key}'"
        super().__init__(f"{where}: {message}")


@dataclass
class SkipLog:
    """Rows left out on purpose, counted by reason, with the first few locations of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, where: str) -> None:
        """Count one skipped row and remember where it was (up to ``max_examples`` per reason)."""
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.max_examples:
            seen.append(where)

    @property
    def total(self) -> int:
        """How many rows were skipped in all."""
        return sum(self.counts.values())


class Input(NamedTuple):
    """A source file argument of a converter (CLI: ``--name-with-dashes PATH``)."""

    name: str
    help: str
    required: bool


class Option(NamedTuple):
    """An optional non-file argument of a converter, with its type, default and choices."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None


@dataclass(frozen=True)
class Converter:
    """One registered converter: what it reads, what it produces, and the function doing it."""

    name: str
    help: str
    kind: str
    inputs: list[Input]
    options: list[Option]
    fn: Callable[..., list[dict[str, Any]]]
    side_files: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]] | None = None

    @property
    def argument_names(self) -> list[str]:
        """Every keyword the converter accepts: inputs first, then options."""
        return [i.name for i in self.inputs] + [o.name for o in self.options]

    def resolve(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Check keyword arguments and fill option defaults (``None`` means not given)."""
        unknown = [key for key in arguments if key not in self.argument_names]
        if unknown:
            raise TypeError(f"converter {self.name!r} takes no argument {unknown[0]!r}; it takes: "
                            f"{', '.join(self.argument_names)}")
        resolved: dict[str, Any] = {}
        for spec in self.inputs:
            value = arguments.get(spec.name)
            if value is None and spec.required:
                raise ValueError(f"converter {self.name!r} needs the input {spec.name!r} "
                                 f"({spec.help})")
            resolved[spec.name] = value
        for option in self.options:
            value = arguments.get(option.name)
            if value is None:
                value = option.default
            elif isinstance(value, bool):
                raise ValueError(f"converter {self.name!r}: option {option.name!r} must be "
                                 f"{option.type.__name__}, got {value!r}")
            elif not isinstance(value, option.type):
                try:
                    value = option.type(value)
                except (TypeError, ValueError):
                    raise ValueError(f"converter {self.name!r}: option {option.name!r} must be "
                                     f"{option.type.__name__}, got {value!r}") from None
            if value is not None and option.choices is not None and value not in option.choices:
                raise ValueError(f"converter {self.name!r}: option {option.name!r} must be one of "
                                 f"{', '.join(map(str, option.choices))}, got {value!r}")
            resolved[option.name] = value
        return resolved

    def __call__(self, *, skipped: SkipLog | None = None, **arguments: Any) -> list[dict[str, Any]]:
        """Run the converter on keyword arguments (defaults filled in); return the records."""
        return self.fn(**self.resolve(arguments), skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Reading the sources


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{what} not found", str(path))
    return path


def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = _existing_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ConversionError(path, f"invalid JSON ({error.msg})", line=error.lineno) from None


def _read_csv(path: str | os.PathLike, what: str, columns: Iterable[str],
              delimiter: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row as {column: text}) after checking the header has ``columns``."""
    path = _existing_file(path, what)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ConversionError(path, f"empty file; expected a header with columns "
                                        f"{', '.join(columns)}")
        header = [name.strip() for name in header]
        for column in columns:
            if column not in header:
                raise ConversionError(path, f"missing column (found columns: "
                                            f"{', '.join(header) or 'none'})"
                                            f"{_delimiter_hint(header, delimiter)}", column=column)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ConversionError(path, f"expected {len(header)} fields like the header, "
                                            f"got {len(row)}", line=reader.line_num)
            yield reader.line_num, dict(zip(header, row, strict=True))


def _delimiter_hint(header: list[str], delimiter: str) -> str:
    """Point at the usual cause of a one-column header: the file uses the other delimiter."""
    other, name = ("\t", "tab") if delimiter == "," else (",", "comma")
    if len(header) == 1 and other in header[0]:
        return f" (the header holds {name}s: is the file {name}-separated?)"
    return ""


def _require_keys(item: Any, keys: Iterable[str], path: Path, index: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ConversionError(path, f"expected an object, got {type(item).__name__}", item=index)
    for key in keys:
        if key not in item:
            raise ConversionError(path, "missing key", item=index, key=key)
    return item


def _json_list(data: Any, path: Path, key: str | None = None) -> list[Any]:
    if key is not None:
        if not isinstance(data, dict):
            raise ConversionError(path, f"expected a JSON object with key '{key}', got "
                                        f"{type(data).__name__}")
        if key not in data:
            raise ConversionError(path, f"missing top-level key (found: "
                                        f"{', '.join(map(str, data)) or 'none'})", key=key)
        data = data[key]
    if not isinstance(data, list):
        raise ConversionError(path, f"expected a JSON list, got {type(data).__name__}", key=key)
    return data


def _render(template: str, fields: dict[str, Any], converter: str) -> str:
    try:
        return template.format(**fields)
    except KeyError as error:
        raise ValueError(f"{converter}: video_template {template!r} uses unknown field "
                         f"{{{error.args[0]}}}; available fields: "
                         f"{', '.join('{' + name + '}' for name in fields)}") from None
    except (ValueError, IndexError, AttributeError) as error:
        raise ValueError(f"{converter}: video_template {template!r} cannot be rendered "
                         f"({error})") from None


def _check_template(template: str, converter: str) -> None:
    """Reject templates with positional fields early, before any row is read."""
    try:
        names = [parsed[1] for parsed in string.Formatter().parse(template) if parsed[1] is not None]
    except ValueError as error:
        raise ValueError(f"{converter}: invalid video_template {template!r} ({error})") from None
    if not names:
        raise ValueError(f"{converter}: video_template {template!r} has no field, so every "
                         "record would name the same video")
    if any(name == "" or name.isdigit() for name in names):
        raise ValueError(f"{converter}: video_template {template!r} must use named fields "
                         "like {video_id}")


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _skip(skipped: SkipLog | None, reason: str, where: str) -> None:
    if skipped is not None:
        skipped.add(reason, where)


def _nonempty(records: list[dict[str, Any]], converter: str, inputs: dict[str, Any],
              skipped: SkipLog | None) -> list[dict[str, Any]]:
    if not records:
        given = {name: value for name, value in inputs.items() if value is not None}
        reasons = ""
        if skipped is not None and skipped.total:
            reasons = "; skipped: " + ", ".join(f"{count} x {reason}"
                                                for reason, count in skipped.counts.items())
        listing = ", ".join(f"{name}={str(value)!r}" for name, value in given.items())
        raise ConversionError(next(iter(given.values()), converter),
                              f"no {converter} record produced (from {listing}){reasons}")
    return records


# ---------------------------------------------------------------------------------------------
# Converters


def msrvtt_records(data_json: str | os.PathLike | None = None,
                   split_csv: str | os.PathLike | None = None,
                   test_csv: str | os.PathLike | None = None, split: str | None = None,
                   video_template: str = "{video_id}.mp4",
                   skipped: SkipLog | None = None) -> list[dict[str, Any]]:
    """MSRVTT retrieval records from MSRVTT_data.json (+ split CSV) or the JSFUSION test CSV."""
    _check_template(video_template, "msrvtt")
    inputs = {"data_json": data_json, "split_csv": split_csv, "test_csv": test_csv}
    if test_csv is not None:
        if data_json is not None or split_csv is not None or split is not None:
            raise ValueError("msrvtt: give either test_csv (MSRVTT_JSFUSION_test.csv) or "
                             "data_json (MSRVTT_data.json, with split_csv or split), not both")
        return _nonempty(_msrvtt_test(test_csv, video_template, skipped), "msrvtt", inputs, skipped)
    if data_json is None:
        raise ValueError("msrvtt: needs data_json (MSRVTT_data.json, optionally with split_csv) "
                         "or test_csv (MSRVTT_JSFUSION_test.csv)")
    if split_csv is not None and split is not None:
        raise ValueError("msrvtt: give split_csv or split, not both")
    if split is not None and split not in MSRVTT_SPLITS:
        raise ValueError(f"msrvtt: split must be one of {', '.join(MSRVTT_SPLITS)}, got {split!r}")
    path = Path(data_json)
    data = _read_json(path, "MSRVTT data JSON")
    videos = _json_list(data, path, "videos")
    sentences = _json_list(data, path, "sentences")

    video_split: dict[str, str] = {}
    for index, video in enumerate(videos):
        _require_keys(video, ("video_id",), path, index)
        video_split[str(video["video_id"])] = str(video.get("split", ""))
    captions: dict[str, list[str]] = {}
    for index, sentence in enumerate(sentences):
        _require_keys(sentence, ("caption", "video_id"), path, index)
        caption = _text(sentence["caption"])
        if not caption:
            _skip(skipped, "empty caption", f"{path}: sentences item {index}")
            continue
        captions.setdefault(str(sentence["video_id"]), []).append(caption)

    if split_csv is not None:
        wanted = []
        for line, row in _read_csv(split_csv, "MSRVTT split CSV", ("video_id",)):
            video_id = row["video_id"].strip()
            if video_id not in video_split:
                raise ConversionError(split_csv, f"video_id {video_id!r} is not among the videos "
                                                 f"of {path}", line=line, column="video_id")
            wanted.append(video_id)
    elif split is not None:
        wanted = [video_id for video_id, own in video_split.items() if own == split]
    else:
        wanted = list(video_split)

    records = []
    for video_id in dict.fromkeys(wanted):
        if video_id not in captions:
            _skip(skipped, "video without captions", f"{path}: {video_id}")
            continue
        records.append({"video": _render(video_template, {"video_id": video_id}, "msrvtt"),
                        "caption": captions[video_id]})
    return _nonempty(records, "msrvtt", inputs, skipped)


def _msrvtt_test(test_csv: str | os.PathLike, video_template: str,
                 skipped: SkipLog | None) -> list[dict[str, Any]]:
    captions: dict[str, list[str]] = {}
    for line, row in _read_csv(test_csv, "MSRVTT test CSV", ("video_id", "sentence")):
        video_id = row["video_id"].strip()
        if not video_id:
            raise ConversionError(test_csv, "empty video_id", line=line, column="video_id")
        sentence = row["sentence"].strip()
        if not sentence:
            _skip(skipped, "empty caption", f"{test_csv}: line {line}")
            continue
        captions.setdefault(video_id, []).append(sentence)
    return [{"video": _render(video_template, {"video_id": video_id}, "msrvtt"),
             "caption": texts[0] if len(texts) == 1 else texts}
            for video_id, texts in captions.items()]


def _didemo_span(times: Any, path: Path, index: int) -> tuple[int, int]:
    """The consensus segment span: the most annotated [first, last], earliest on ties."""
    if not isinstance(times, list) or not times:
        raise ConversionError(path, f"expected a non-empty list of [first, last] segment "
                                    f"indices, got {times!r}", item=index, key="times")
    spans = []
    for span in times:
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in span)
                and 0 <= span[0] <= span[1]):
            raise ConversionError(path, f"malformed segment span {span!r}; expected "
                                        "[first, last] with 0 <= first <= last",
                                  item=index, key="times")
        spans.append((span[0], span[1]))
    counts = Counter(spans)
    return max(spans, key=lambda span: (counts[span], -spans.index(span)))


def didemo_records(data_json: str | os.PathLike, mode: str = "paragraph",
                   video_template: str = "{stem}.mp4",
                   skipped: SkipLog | None = None) -> list[dict[str, Any]]:
    """DiDeMo records: one paragraph per video, or one record per description with start/end."""
    if mode not in DIDEMO_MODES:
        raise ValueError(f"didemo: mode must be one of {', '.join(DIDEMO_MODES)}, got {mode!r}")
    _check_template(video_template, "didemo")
    path = Path(data_json)
    items = _json_list(_read_json(path, "DiDeMo data JSON"), path)
    parsed = []
    for index, item in enumerate(items):
        _require_keys(item, ("video", "times", "description"), path, index)
        name = _text(item["video"])
        if not name:
            raise ConversionError(path, "empty video name", item=index, key="video")
        span = _didemo_span(item["times"], path, index)
        description = _text(item["description"])
        if not description:
            _skip(skipped, "empty description", f"{path}: item {index}")
            continue
        video = _render(video_template, {"name": name, "stem": Path(name).stem}, "didemo")
        parsed.append((video, span, description))

    if mode == "segment":
        records = [{"video": video, "caption": description,
                    "start": first * DIDEMO_SEGMENT_SECONDS,
                    "end": (last + 1) * DIDEMO_SEGMENT_SECONDS}
                   for video, (first, last), description in parsed]
    else:
        by_video: dict[str, list[tuple[tuple[int, int], int, str]]] = {}
        for order, (video, span, description) in enumerate(parsed):
            by_video.setdefault(video, []).append((span, order, description))
        records = [{"video": video, "caption": " ".join(text for _, _, text in sorted(parts))}
                   for video, parts in by_video.items()]
    return _nonempty(records, "didemo", {"data_json": data_json}, skipped)


_MSVD_MAPPING_LINE = re.compile(r"^(\S+)\s+vid(\d+)$")


def read_youtube_mapping(mapping: str | os.PathLike) -> dict[int, str]:
    """Parse MSVD's youtube_mapping.txt into {video number: YouTube clip name}."""
    path = _existing_file(mapping, "MSVD youtube mapping")
    numbers: dict[int, str] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            match = _MSVD_MAPPING_LINE.match(line)
            if match is None:
                raise ConversionError(path, f"expected '<youtube clip name> vid<N>', got {line!r}",
                                      line=line_no)
            numbers[int(match.group(2))] = match.group(1)
    if not numbers:
        raise ConversionError(path, "no '<youtube clip name> vid<N>' line")
    return numbers


def _msvd_video_number(value: Any, path: Path, index: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().removeprefix("vid").isdigit():
        return int(value.strip().removeprefix("vid"))
    raise ConversionError(path, f"expected an integer video id, got {value!r}", item=index,
                          key="video_id")


def _read_msvd_qa(qa_json: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    path = Path(qa_json)
    items = _json_list(_read_json(path, "MSVD-QA JSON"), path)
    for index, item in enumerate(items):
        _require_keys(item, ("question", "answer", "video_id"), path, index)
    return path, items


def msvd_qa_records(qa_json: str | os.PathLike, mapping: str | os.PathLike,
                    train_qa: str | os.PathLike | None = None,
                    video_template: str = "{name}.avi", top_k: int = MSVD_TOP_K,
                    skipped: SkipLog | None = None) -> list[dict[str, Any]]:
    """MSVD-QA records {video, question, answer}, video names looked up in youtube_mapping.txt.

    ``train_qa`` and ``top_k`` only shape the answer vocabulary (`msvd_answer_vocabulary`).
    """
    _check_template(video_template, "msvd_qa")
    names = read_youtube_mapping(mapping)
    path, items = _read_msvd_qa(qa_json)
    records = []
    for index, item in enumerate(items):
        number = _msvd_video_number(item["video_id"], path, index)
        if number not in names:
            raise ConversionError(path, f"video_id {number} (vid{number}) is not in {mapping}",
                                  item=index, key="video_id")
        for key in ("question", "answer"):
            if not isinstance(item[key], str):
                raise ConversionError(path, f"expected a string, got {item[key]!r}", item=index,
                                      key=key)
        question, answer = item["question"].strip(), item["answer"].strip()
        if not question or not answer:
            _skip(skipped, f"empty {'question' if not question else 'answer'}",
                  f"{path}: item {index}")
            continue
        fields = {"name": names[number], "vid": f"vid{number}", "video_id": number}
        records.append({"video": _render(video_template, fields, "msvd_qa"),
                        "question": question, "answer": answer})
    inputs = {"qa_json": qa_json, "mapping": mapping}
    return _nonempty(records, "msvd_qa", inputs, skipped)


def answer_vocabulary(answers: Iterable[str], top_k: int = MSVD_TOP_K) -> list[str]:
    """The ``top_k`` most frequent answers, most frequent first (ties alphabetical)."""
    counts = Counter(answer.strip() for answer in answers if answer and answer.strip())
    return sorted(counts, key=lambda answer: (-counts[answer], answer))[:top_k]


def msvd_answer_vocabulary(train_qa: str | os.PathLike, top_k: int = MSVD_TOP_K) -> list[str]:
    """The answer vocabulary of an MSVD-QA training file: its ``top_k`` most frequent answers."""
    _, items = _read_msvd_qa(train_qa)
    return answer_vocabulary((str(item["answer"]) for item in items), top_k)


def _msvd_side_files(records: list[dict[str, Any]], arguments: dict[str, Any]) -> dict[str, Any]:
    if not arguments["top_k"] or arguments["top_k"] <= 0:
        return {}
    source = arguments["train_qa"] or arguments["qa_json"]
    return {"answers.json": msvd_answer_vocabulary(source, arguments["top_k"])}


MSRVTT_MC_OPTIONS = ("a1", "a2", "a3", "a4", "a5")


def msrvtt_mc_records(mc_csv: str | os.PathLike, video_template: str = "{video_id}.mp4",
                      skipped: SkipLog | None = None) -> list[dict[str, Any]]:
    """MSRVTT multiple-choice records {video, caption: [5 options], answer} from MSR_MC_test.csv."""
    _check_template(video_template, "msrvtt_mc")
    columns = ("video_id", *MSRVTT_MC_OPTIONS, "answer")
    records = []
    for line, row in _read_csv(mc_csv, "MSRVTT multiple-choice CSV", columns, delimiter="\t"):
        video_id = row["video_id"].strip()
        if not video_id:
            raise ConversionError(mc_csv, "empty video_id", line=line, column="video_id")
        options = [row[name].strip() for name in MSRVTT_MC_OPTIONS]
        for name, option in zip(MSRVTT_MC_OPTIONS, options, strict=True):
            if not option:
                raise ConversionError(mc_csv, "empty option", line=line, column=name)
        answer = row["answer"].strip()
        if not answer.isdigit() or not 0 <= int(answer) < len(options):
            raise ConversionError(mc_csv, f"expected an option index 0..{len(options) - 1}, got "
                                          f"{answer!r}", line=line, column="answer")
        records.append({"video": _render(video_template, {"video_id": video_id}, "msrvtt_mc"),
                        "caption": options, "answer": int(answer)})
    return _nonempty(records, "msrvtt_mc", {"mc_csv": mc_csv}, skipped)


WEBVID_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")


def webvid_records(csv_file: str | os.PathLike, video_template: str = "{page_dir}/{videoid}.mp4",
                   skipped: SkipLog | None = None) -> list[dict[str, Any]]:
    """WebVid records {video, caption: name}; rows missing a caption or id are skipped."""
    _check_template(video_template, "webvid")
    records = []
    for line, row in _read_csv(csv_file, "WebVid CSV", ("videoid", "page_dir", "name")):
        row = {key: value.strip() for key, value in row.items()}
        if not row["videoid"] or not row["page_dir"]:
            _skip(skipped, "empty videoid or page_dir", f"{csv_file}: line {line}")
            continue
        if not row["name"]:
            _skip(skipped, "empty caption", f"{csv_file}: line {line}")
            continue
        records.append({"video": _render(video_template, row, "webvid"), "caption": row["name"]})
    return _nonempty(records, "webvid", {"csv_file": csv_file}, skipped)


def _whole_seconds(value: str, path: str | os.PathLike, line: int, column: str) -> int:
    """Kinetics times as whole seconds, truncated like the download script's ``%06d``."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0 or seconds == float("inf"):
        raise ConversionError(path, f"expected a non-negative number of seconds, got {value!r}",
                              line=line, column=column)
    return int(seconds)


def kinetics_records(csv_file: str | os.PathLike, split: str | None = None,
                     video_template: str = "{youtube_id}_{time_start:06d}_{time_end:06d}.mp4",
                     skipped: SkipLog | None = None) -> list[dict[str, Any]]:
    """Kinetics classification records {video, label} named like the usual download script's."""
    _check_template(video_template, "kinetics")
    columns = ("label", "youtube_id", "time_start", "time_end", "split")
    records = []
    for line, row in _read_csv(csv_file, "Kinetics CSV", columns):
        if split is not None and row["split"].strip() != split:
            _skip(skipped, f"split is not {split!r}", f"{csv_file}: line {line}")
            continue
        youtube_id = row["youtube_id"].strip()
        if not youtube_id:
            raise ConversionError(csv_file, "empty youtube_id", line=line, column="youtube_id")
        label = row["label"].strip()
        if not label:
            _skip(skipped, "empty label", f"{csv_file}: line {line}")
            continue
        fields = {"youtube_id": youtube_id, "label": label, "split": row["split"].strip(),
                  "time_start": _whole_seconds(row["time_start"], csv_file, line, "time_start"),
                  "time_end": _whole_seconds(row["time_end"], csv_file, line, "time_end")}
        records.append({"video": _render(video_template, fields, "kinetics"), "label": label})
    inputs = {"csv_file": csv_file, "split": split}
    return _nonempty(records, "kinetics", inputs, skipped)


def kinetics_classes(records: Iterable[dict[str, Any]]) -> list[str]:
    """The sorted class names of classification records (the index of a name is its class id)."""
    return sorted({str(record["label"]) for record in records})


# ---------------------------------------------------------------------------------------------
# Registry

_TEMPLATE_HELP = "video path template (Python format string); fields: "

CONVERTERS: dict[str, Converter] = {
    converter.name: converter for converter in (
        Converter(
            name="msrvtt", kind="retrieval",
            help="MSRVTT retrieval: MSRVTT_data.json (+ train split CSV), or the 1k-A "
                 "JSFUSION test CSV",
            inputs=[
                Input("data_json", "MSRVTT_data.json (keys 'videos' and 'sentences'); one "
                                   "record per video with all its captions", False),
                Input("split_csv", "training split CSV with a 'video_id' column "
                                   "(MSRVTT_train.9k.csv or MSRVTT_train.7k.csv); "
                                   "with data_json", False),
                Input("test_csv", "MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence); "
                                  "instead of data_json", False),
            ],
            options=[
                Option("split", str, None, "with data_json and no split_csv: keep the videos "
                                           "of this split of the JSON", MSRVTT_SPLITS),
                Option("video_template", str, "{video_id}.mp4", _TEMPLATE_HELP + "{video_id}"),
            ],
            fn=msrvtt_records),
        Converter(
            name="didemo", kind="retrieval",
            help="DiDeMo: {train,val,test}_data.json, paragraph (per video) or segment "
                 "(per description, with start/end) records",
            inputs=[Input("data_json", "DiDeMo train_data.json, val_data.json or "
                                       "test_data.json", True)],
            options=[
                Option("mode", str, "paragraph", "paragraph: one record per video, descriptions "
                                                 "joined in segment order; segment: one record "
                                                 "per description with start/end seconds",
                       DIDEMO_MODES),
                Option("video_template", str, "{stem}.mp4",
                       _TEMPLATE_HELP + "{name} (original file name), {stem} (without "
                                        "extension)"),
            ],
            fn=didemo_records),
        Converter(
            name="msvd_qa", kind="qa",
            help="MSVD-QA: {train,val,test}_qa.json + youtube_mapping.txt; writes the "
                 "answer vocabulary to answers.json",
            inputs=[
                Input("qa_json", "MSVD-QA train_qa.json, val_qa.json or test_qa.json", True),
                Input("mapping", "youtube_mapping.txt ('<youtube clip name> vid<N>' lines)", True),
                Input("train_qa", "training QA file to build answers.json from (default: "
                                  "qa_json; pass train_qa.json when converting val/test)", False),
            ],
            options=[
                Option("video_template", str, "{name}.avi",
                       _TEMPLATE_HELP + "{name} (YouTube clip name), {vid} (vid<N>), "
                                        "{video_id} (N)"),
                Option("top_k", int, MSVD_TOP_K, "answers.json keeps the top_k most frequent "
                                                 "training answers (0: no answers.json)"),
            ],
            fn=msvd_qa_records, side_files=_msvd_side_files),
        Converter(
            name="msrvtt_mc", kind="mc",
            help="MSRVTT multiple choice: tab-separated MSR_MC_test.csv (5 options, answer "
                 "index)",
            inputs=[Input("mc_csv", "MSR_MC_test.csv (tab-separated: key vid_key video_id "
                                    "a1..a5 answer)", True)],
            options=[Option("video_template", str, "{video_id}.mp4",
                            _TEMPLATE_HELP + "{video_id}")],
            fn=msrvtt_mc_records),
        Converter(
            name="webvid", kind="retrieval",
            help="WebVid: CSV with videoid,contentUrl,duration,page_dir,name",
            inputs=[Input("csv_file", "WebVid CSV (e.g. results_2M_train.csv)", True)],
            options=[Option("video_template", str, "{page_dir}/{videoid}.mp4",
                            _TEMPLATE_HELP + ", ".join("{" + c + "}" for c in WEBVID_COLUMNS))],
            fn=webvid_records),
        Converter(
            name="kinetics", kind="classification",
            help="Kinetics: CSV with label,youtube_id,time_start,time_end,split; writes the "
                 "sorted class list to classes.json",
            inputs=[Input("csv_file", "Kinetics CSV (e.g. train.csv, validate.csv)", True)],
            options=[
                Option("split", str, None, "keep only rows whose split column is this "
                                           "(e.g. train, val, validate)"),
                Option("video_template", str, "{youtube_id}_{time_start:06d}_{time_end:06d}.mp4",
                       _TEMPLATE_HELP + "{youtube_id}, {time_start}, {time_end} (whole "
                                        "seconds), {label}, {split}"),
            ],
            fn=kinetics_records,
            side_files=lambda records, arguments: {"classes.json": kinetics_classes(records)}),
    )
}


def list_converters() -> list[str]:
    """The registered converter names, sorted."""
    return sorted(CONVERTERS)


def get_converter(name: str) -> Converter:
    """The registered converter called ``name`` (dashes allowed), or a KeyError with suggestions."""
    key = name.replace("-", "_")
    if key not in CONVERTERS:
        close = difflib.get_close_matches(key, CONVERTERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown converter {name!r}{hint} (available: "
                       f"{', '.join(list_converters())})")
    return CONVERTERS[key]


def convert(name: str, out: str | os.PathLike, **arguments: Any) -> dict[str, Any]:
    """Run converter ``name``, write its records to ``out`` (+ side files) and return a summary.

    ``arguments`` are the converter's inputs and options by name (``None`` = not given).
    The summary holds ``converter``, ``kind``, ``output``, ``records``, ``skipped``
    ({reason: count}), ``skipped_total``, ``skipped_examples`` ({reason: [where, ...]}),
    ``side_files`` ({file name: path}) and ``inputs`` ({name: path}).
    """
    converter = get_converter(name)
    resolved = converter.resolve(arguments)
    out = Path(out)
    skipped = SkipLog()
    records = converter.fn(**resolved, skipped=skipped)
    side = converter.side_files(records, resolved) if converter.side_files else {}
    side_paths = {filename: out.parent / filename for filename in side}
    for filename, path in side_paths.items():
        if path.resolve() == out.resolve():
            raise ValueError(f"{converter.name}: the output {out} would be overwritten by the "
                             f"side file {filename}; choose another output name")
    write_annotations(records, out, kind=converter.kind)
    for filename, payload in side.items():
        atomic_write_text(side_paths[filename],
                          json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    return {
        "converter": converter.name,
        "kind": converter.kind,
        "output": str(out),
        "records": len(records),
        "skipped": dict(skipped.counts),
        "skipped_total": skipped.total,
        "skipped_examples": dict(skipped.examples),
        "side_files": {filename: str(path) for filename, path in side_paths.items()},
        "inputs": {spec.name: str(resolved[spec.name]) for spec in converter.inputs
                   if resolved[spec.name] is not None},
    }
