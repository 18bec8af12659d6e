import json

import pytest

from leanvl.data.annotations import (
    AnnotationError,
    check_records,
    infer_kind,
    load_annotations,
    validate_record,
    write_annotations,
)


@pytest.mark.parametrize("record,kind", [
    ({"video": "a.mp4", "caption": "a dog"}, "retrieval"),
    ({"video": "a.mp4", "caption": ["a", "b"]}, "retrieval"),
    ({"video": "a.mp4", "question": "what?", "answer": "dog"}, "qa"),
    ({"video": "a.mp4", "caption": ["a", "b", "c", "d", "e"], "answer": 2}, "mc"),
    ({"video": "a.mp4", "label": "juggling"}, "classification"),
    ({"video": "a.mp4", "label": 3}, "classification"),
    ({"image": "a.jpg", "caption": "a cat"}, "image"),
    ({"video": "a.mp4", "caption": "it rises", "negative_caption": ["it sinks"]}, "retrieval"),
])
def test_every_format_validates_and_is_inferred(record, kind):
    assert infer_kind(record) == kind
    assert validate_record(record) == kind


@pytest.mark.parametrize("record,field,fragment", [
    ({"caption": "x"}, "video", "missing"),
    ({"video": "", "caption": "x"}, "video", "non-empty path"),
    ({"video": "a.mp4", "caption": 3}, "caption", "string"),
    ({"video": "a.mp4", "caption": []}, "caption", "non-empty list"),
    ({"video": "a.mp4", "caption": "x", "negative_caption": [""]}, "negative_caption", "list"),
    ({"video": "a.mp4", "question": "q"}, "answer", "missing"),
    ({"video": "a.mp4", "caption": ["a", "b"], "answer": 5}, "answer", "out of range"),
    ({"video": "a.mp4", "caption": "x", "start": -1}, "start", "non-negative"),
    ({"video": "a.mp4", "caption": "x", "start": 5, "end": 2}, "end", "after start"),
])
def test_bad_record_names_file_index_and_field(tmp_path, record, field, fragment):
    path = tmp_path / "anno.json"
    path.write_text(json.dumps([{"video": "ok.mp4", "caption": "fine"}, record]))
    with pytest.raises(AnnotationError) as info:
        load_annotations(path)
    message = str(info.value)
    assert str(path) in message and "record 1" in message
    assert f"field '{field}'" in message and fragment in message
    assert info.value.index == 1 and info.value.field == field


def test_kind_mismatch_is_reported(tmp_path):
    path = write_annotations([{"video": "a.mp4", "caption": "x"}], tmp_path / "a.json")
    with pytest.raises(AnnotationError, match="field 'question'"):
        load_annotations(path, kind="qa")


def test_jsonl_bad_line_and_non_list_json(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"video": "a.mp4", "caption": "x"}\n\n{not json}\n')
    with pytest.raises(AnnotationError, match=r"line 3: invalid JSON"):
        load_annotations(jsonl)
    obj = tmp_path / "b.json"
    obj.write_text('{"video": "a.mp4"}')
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        load_annotations(obj)
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "missing.json")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_then_load_round_trip_keeps_extra_keys(tmp_path, suffix):
    records = [{"video": f"v{i}.mp4", "caption": [f"c{i}", "d"], "facts": {"i": i}} for i in range(3)]
    path = write_annotations(records, tmp_path / f"out{suffix}")
    assert load_annotations(path) == records
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_check_records_collects_all_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"video": "a.mp4", "caption": "x"}, {"video": 3}, {"caption": "y"}]))
    good, errors = check_records(path)
    assert [i for i, _ in good] == [0]
    assert [e.index for e in errors] == [1, 2]
