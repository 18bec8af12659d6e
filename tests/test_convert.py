"""Converters from the benchmarks' own files: hand-written samples -> hand-written records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from leanvl.data.annotations import load_annotations
from leanvl.data.convert import (
    CONVERTERS,
    ConversionError,
    Input,
    Option,
    SkipLog,
    answer_vocabulary,
    convert,
    didemo_records,
    get_converter,
    kinetics_classes,
    kinetics_records,
    msrvtt_mc_records,
    msrvtt_records,
    msvd_answer_vocabulary,
    msvd_qa_records,
    read_youtube_mapping,
    webvid_records,
)

FIXTURES = Path(__file__).parent / "fixtures" / "convert"
MSRVTT_DATA = FIXTURES / "MSRVTT_data.json"
MSRVTT_TRAIN = FIXTURES / "MSRVTT_train.9k.csv"
MSRVTT_TEST = FIXTURES / "MSRVTT_JSFUSION_test.csv"
MSRVTT_MC = FIXTURES / "MSR_MC_test.csv"
DIDEMO = FIXTURES / "didemo_train_data.json"
MSVD_TRAIN = FIXTURES / "msvd_train_qa.json"
MSVD_TEST = FIXTURES / "msvd_test_qa.json"
MSVD_MAPPING = FIXTURES / "youtube_mapping.txt"
WEBVID = FIXTURES / "webvid_results_2M_train.csv"
KINETICS = FIXTURES / "kinetics400_train.csv"

DIDEMO_A = "10015567@N08_3655084291_d8b58466fa"
DIDEMO_B = "27201536@N00_6042380516_b9a8a0e1f2"
DIDEMO_C = "95775186@N00_8440232744_5c0fbf6a2a"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- msrvtt -----------------------------------------------------------------------------------


def test_msrvtt_train_split_gives_all_captions_per_video():
    skipped = SkipLog()
    records = msrvtt_records(data_json=MSRVTT_DATA, split_csv=MSRVTT_TRAIN, skipped=skipped)
    assert records == [
        {"video": "video0.mp4", "caption": ["a car is shown", "a man is talking about a car"]},
        {"video": "video1.mp4", "caption": ["a woman is singing on stage", "a woman sings a song"]},
        {"video": "video2.mp4", "caption": [
            "a cartoon animals runs through an ice cave in a video game",
            "a character is running in a game"]},
    ]
    assert skipped.counts == {"empty caption": 1, "video without captions": 1}
    assert "video3" in skipped.examples["video without captions"][0]


def test_msrvtt_json_split_field_and_template():
    records = msrvtt_records(data_json=MSRVTT_DATA, split="validate",
                             video_template="videos/{video_id}.webm")
    assert records == [{"video": "videos/video6513.webm",
                        "caption": ["people are dancing at a party"]}]


def test_msrvtt_jsfusion_test_one_sentence_per_video():
    assert msrvtt_records(test_csv=MSRVTT_TEST) == [
        {"video": "video7020.mp4", "caption": "a family is having coversation"},
        {"video": "video7021.mp4", "caption": "a man is explaining how a car engine works"},
        {"video": "video7022.mp4", "caption": "a woman, wearing a red hat, sings on a stage"},
    ]


def test_msrvtt_rejects_mixed_or_missing_inputs():
    with pytest.raises(ValueError, match="either test_csv"):
        msrvtt_records(data_json=MSRVTT_DATA, test_csv=MSRVTT_TEST)
    with pytest.raises(ValueError, match="needs data_json"):
        msrvtt_records()
    with pytest.raises(ValueError, match="split_csv or split"):
        msrvtt_records(data_json=MSRVTT_DATA, split_csv=MSRVTT_TRAIN, split="train")


def test_msrvtt_missing_key_and_unknown_video(tmp_path):
    data = json.loads(MSRVTT_DATA.read_text())
    del data["sentences"]
    bad = write(tmp_path / "MSRVTT_data.json", json.dumps(data))
    with pytest.raises(ConversionError, match="key 'sentences'") as error:
        msrvtt_records(data_json=bad)
    assert str(bad) in str(error.value)

    split = write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo9999\n")
    with pytest.raises(ConversionError, match=r"line 3: column 'video_id'.*video9999"):
        msrvtt_records(data_json=MSRVTT_DATA, split_csv=split)

    no_column = write(tmp_path / "split.csv", "vid\nvideo0\n")
    with pytest.raises(ConversionError, match="column 'video_id': missing column"):
        msrvtt_records(data_json=MSRVTT_DATA, split_csv=no_column)


# --- didemo -----------------------------------------------------------------------------------


def test_didemo_paragraph_joins_descriptions_in_segment_order():
    skipped = SkipLog()
    assert didemo_records(DIDEMO, skipped=skipped) == [
        {"video": f"{DIDEMO_A}.mp4", "caption": "the camera pans to the left a man with a red hat "
                                                "walks into view the dog jumps into the water."},
        # the girl's most annotated span ties [0,0] with [3,3]: the first annotated one wins
        {"video": f"{DIDEMO_B}.mp4", "caption": "a girl falls down children play in the snow"},
        {"video": f"{DIDEMO_C}.mp4", "caption": "a bird flies past the window"},
    ]
    assert skipped.counts == {"empty description": 1}


def test_didemo_segment_mode_uses_five_second_segments():
    records = didemo_records(DIDEMO, mode="segment", video_template="{name}")
    assert records == [
        {"video": f"{DIDEMO_A}.mov", "caption": "a man with a red hat walks into view",
         "start": 10, "end": 15},
        {"video": f"{DIDEMO_A}.mov", "caption": "the camera pans to the left", "start": 0, "end": 5},
        {"video": f"{DIDEMO_A}.mov", "caption": "the dog jumps into the water.",
         "start": 20, "end": 30},
        {"video": f"{DIDEMO_B}.mp4", "caption": "children play in the snow", "start": 5, "end": 10},
        {"video": f"{DIDEMO_B}.mp4", "caption": "a girl falls down", "start": 0, "end": 5},
        {"video": f"{DIDEMO_C}.m4v", "caption": "a bird flies past the window",
         "start": 15, "end": 25},
    ]


def test_didemo_malformed_times_names_item(tmp_path):
    items = json.loads(DIDEMO.read_text())
    items[2]["times"] = [[3, 1]]
    bad = write(tmp_path / "train_data.json", json.dumps(items))
    with pytest.raises(ConversionError, match=r"item 2: key 'times'"):
        didemo_records(bad)
    del items[1]["description"]
    bad = write(tmp_path / "val_data.json", json.dumps(items))
    with pytest.raises(ConversionError, match=r"val_data.json: item 1: key 'description'"):
        didemo_records(bad)


# --- msvd_qa ----------------------------------------------------------------------------------


def test_msvd_qa_maps_video_ids_to_youtube_clips():
    assert msvd_qa_records(MSVD_TRAIN, MSVD_MAPPING)[:3] == [
        {"video": "-4wsuPCjDBc_5_15.avi", "question": "what is chewing on a nut?",
         "answer": "animal"},
        {"video": "-4wsuPCjDBc_5_15.avi", "question": "what is eating a nut?",
         "answer": "squirrel"},
        {"video": "-7KMZQEsJW4_205_208.avi", "question": "who is playing a guitar?",
         "answer": "man"},
    ]
    assert msvd_qa_records(MSVD_TEST, MSVD_MAPPING, video_template="YouTubeClips/{vid}.avi") == [
        {"video": "YouTubeClips/vid4.avi", "question": "who is riding a horse?", "answer": "woman"},
        {"video": "YouTubeClips/vid4.avi", "question": "what is a woman riding?",
         "answer": "horse"},
    ]


def test_msvd_answer_vocabulary_is_top_k_training_answers():
    assert msvd_answer_vocabulary(MSVD_TRAIN) == ["man", "animal", "play", "squirrel"]
    assert msvd_answer_vocabulary(MSVD_TRAIN, top_k=2) == ["man", "animal"]
    assert answer_vocabulary(["b", "a", "b", " ", "c"], top_k=2) == ["b", "a"]


def test_msvd_bad_mapping_and_unknown_video(tmp_path):
    mapping = write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\nbroken line here\n")
    with pytest.raises(ConversionError, match=r"youtube_mapping.txt: line 2"):
        read_youtube_mapping(mapping)
    mapping = write(tmp_path / "mapping.txt", "-4wsuPCjDBc_5_15 vid1\n")
    with pytest.raises(ConversionError, match=r"item 2: key 'video_id'.*vid2"):
        msvd_qa_records(MSVD_TRAIN, mapping)


# --- msrvtt_mc --------------------------------------------------------------------------------


def test_msrvtt_mc_reads_tab_separated_options():
    assert msrvtt_mc_records(MSRVTT_MC) == [
        {"video": "video7020.mp4", "answer": 1, "caption": [
            "a man is cooking in a kitchen", "a family is having coversation",
            "a dog runs on the grass", "cars race on a track", "a girl plays the piano"]},
        {"video": "video7021.mp4", "answer": 0, "caption": [
            "a man is explaining how a car engine works", "people swim in a pool",
            "a cat sleeps on a sofa", "a chef, smiling, slices bread",
            "soldiers march in a parade"]},
        {"video": "video7022.mp4", "answer": 4, "caption": [
            "a boy rides a bike", "two men box in a ring", "a crowd cheers at a game",
            'someone draws a "cartoon" face', "a woman sings on a stage"]},
    ]


def test_msrvtt_mc_bad_answer_names_line_and_comma_file_gets_a_hint(tmp_path):
    lines = MSRVTT_MC.read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\t5"
    bad = write(tmp_path / "MSR_MC_test.csv", "\n".join(lines) + "\n")
    with pytest.raises(ConversionError, match=r"line 3: column 'answer'.*'5'"):
        msrvtt_mc_records(bad)
    commas = write(tmp_path / "mc.csv", "key,vid_key,video_id,a1,a2,a3,a4,a5,answer\n")
    with pytest.raises(ConversionError, match="column 'video_id'.*comma-separated"):
        msrvtt_mc_records(commas)


# --- webvid -----------------------------------------------------------------------------------


def test_webvid_records_and_skipped_empty_captions():
    skipped = SkipLog()
    assert webvid_records(WEBVID, skipped=skipped) == [
        {"video": "006001_006050/21179416.mp4", "caption": "Aerial shot winter forest"},
        {"video": "006001_006050/5629184.mp4",
         "caption": "Senior woman, doing yoga on the beach at sunset"},
        {"video": "006051_006100/1051372612.mp4", "caption": 'Young couple says "hello" to camera'},
    ]
    assert skipped.counts == {"empty caption": 1}
    assert skipped.examples["empty caption"] == [f"{WEBVID}: line 4"]


def test_webvid_unknown_template_field_lists_columns():
    with pytest.raises(ValueError, match=r"unknown field \{page\}.*\{page_dir\}"):
        webvid_records(WEBVID, video_template="{page}/{videoid}.mp4")


def test_webvid_short_row_names_line(tmp_path):
    bad = write(tmp_path / "results_10M_val.csv",
                "videoid,contentUrl,duration,page_dir,name\n1,u,PT00H00M11S,000_001,ok\n2,u\n")
    with pytest.raises(ConversionError, match=r"results_10M_val.csv: line 3: expected 5 fields"):
        webvid_records(bad)


# --- kinetics ---------------------------------------------------------------------------------


def test_kinetics_records_classes_and_split_filter():
    records = kinetics_records(KINETICS)
    assert records == [
        {"video": "-3B32lodo2M_000059_000069.mp4", "label": "abseiling"},
        {"video": "--nQbRBEz2s_000104_000114.mp4", "label": "air drumming"},
        {"video": "0347ZoDXyP0_000009_000019.mp4", "label": "passing American football (in game)"},
        {"video": "7kbO0v4hag4_000000_000010.mp4", "label": "abseiling"},
    ]
    assert kinetics_classes(records) == ["abseiling", "air drumming",
                                         "passing American football (in game)"]
    assert kinetics_records(KINETICS, split="val", video_template="{split}/{label}/{youtube_id}.mp4"
                            ) == [{"video": "val/abseiling/7kbO0v4hag4.mp4", "label": "abseiling"}]


def test_kinetics_bad_time_and_no_matching_split(tmp_path):
    bad = write(tmp_path / "validate.csv", "label,youtube_id,time_start,time_end,split\n"
                                           "abseiling,abc,ten,20,val\n")
    with pytest.raises(ConversionError, match=r"validate.csv: line 2: column 'time_start'"):
        kinetics_records(bad)
    with pytest.raises(ConversionError, match=r"no kinetics record .*4 x split is not 'test'"
                       ) as error:
        kinetics_records(KINETICS, split="test", skipped=SkipLog())
    assert str(KINETICS) in str(error.value)


# --- shared error handling --------------------------------------------------------------------


@pytest.mark.parametrize("name, arguments, source", [
    ("msrvtt", {"data_json": MSRVTT_DATA, "split_csv": MSRVTT_TRAIN}, MSRVTT_TRAIN),
    ("msrvtt", {"test_csv": MSRVTT_TEST}, MSRVTT_TEST),
    ("msrvtt_mc", {"mc_csv": MSRVTT_MC}, MSRVTT_MC),
    ("webvid", {"csv_file": WEBVID}, WEBVID),
    ("kinetics", {"csv_file": KINETICS}, KINETICS),
])
def test_missing_csv_column_is_named(tmp_path, name, arguments, source):
    argument = next(key for key, value in arguments.items() if value == source)
    lines = source.read_text().splitlines()
    delimiter = "\t" if name == "msrvtt_mc" else ","
    header = lines[0].split(delimiter)
    required = {"msrvtt_mc": "answer", "webvid": "name", "kinetics": "label"}.get(
        name, "video_id")
    position = header.index(required)
    header[position] = "renamed"
    bad = write(tmp_path / source.name, "\n".join([delimiter.join(header)] + lines[1:]) + "\n")
    with pytest.raises(ConversionError, match=f"column '{required}': missing column") as error:
        get_converter(name)(**{**arguments, argument: bad})
    assert str(bad) in str(error.value)


@pytest.mark.parametrize("name, argument", [
    (converter.name, spec.name) for converter in CONVERTERS.values() for spec in converter.inputs
])
def test_missing_file_is_named(tmp_path, name, argument):
    complete = {
        "msrvtt": {"data_json": MSRVTT_DATA, "split_csv": MSRVTT_TRAIN},
        "didemo": {"data_json": DIDEMO},
        "msvd_qa": {"qa_json": MSVD_TEST, "mapping": MSVD_MAPPING, "train_qa": MSVD_TRAIN},
        "msrvtt_mc": {"mc_csv": MSRVTT_MC},
        "webvid": {"csv_file": WEBVID},
        "kinetics": {"csv_file": KINETICS},
    }[name]
    if name == "msrvtt" and argument == "test_csv":
        complete = {}
    missing = tmp_path / f"absent_{argument}.file"
    with pytest.raises(FileNotFoundError) as error:
        convert(name, tmp_path / "out.json", **{**complete, argument: missing})
    assert str(missing) in str(error.value)
    assert not (tmp_path / "out.json").exists()


def test_invalid_json_names_file(tmp_path):
    bad = write(tmp_path / "train_data.json", '[{"video": "a.mov",\n')
    with pytest.raises(ConversionError, match=r"train_data.json: line 2: invalid JSON"):
        didemo_records(bad)


# --- registry and convert() -------------------------------------------------------------------


def test_registry_describes_every_converter():
    assert sorted(CONVERTERS) == ["didemo", "kinetics", "msrvtt", "msrvtt_mc", "msvd_qa", "webvid"]
    for name, converter in CONVERTERS.items():
        assert converter.name == name and converter.help and "\n" not in converter.help
        assert converter.kind in ("retrieval", "qa", "mc", "classification")
        assert converter.inputs and all(isinstance(spec, Input) for spec in converter.inputs)
        assert all(isinstance(option, Option) for option in converter.options)
        assert len(set(converter.argument_names)) == len(converter.argument_names)
    assert get_converter("msvd-qa") is CONVERTERS["msvd_qa"]
    with pytest.raises(KeyError, match="did you mean 'msrvtt'"):
        get_converter("msrvt")
    with pytest.raises(TypeError, match="takes no argument 'csv'"):
        convert("webvid", "out.json", csv=WEBVID)
    with pytest.raises(ValueError, match="needs the input 'mapping'"):
        convert("msvd_qa", "out.json", qa_json=MSVD_TRAIN)
    with pytest.raises(ValueError, match="mode' must be one of paragraph, segment"):
        convert("didemo", "out.json", data_json=DIDEMO, mode="sentence")


def test_convert_writes_loadable_jsonl_and_summary(tmp_path):
    out = tmp_path / "msrvtt" / "train.jsonl"
    summary = convert("msrvtt", out, data_json=MSRVTT_DATA, split_csv=MSRVTT_TRAIN,
                      test_csv=None, split=None)
    assert summary == {
        "converter": "msrvtt", "kind": "retrieval", "output": str(out), "records": 3,
        "skipped": {"empty caption": 1, "video without captions": 1}, "skipped_total": 2,
        "skipped_examples": {"empty caption": [f"{MSRVTT_DATA}: sentences item 3"],
                             "video without captions": [f"{MSRVTT_DATA}: video3"]},
        "side_files": {}, "inputs": {"data_json": str(MSRVTT_DATA), "split_csv": str(MSRVTT_TRAIN)},
    }
    assert out.read_text().count("\n") == 3
    assert load_annotations(out, kind="retrieval") == msrvtt_records(
        data_json=MSRVTT_DATA, split_csv=MSRVTT_TRAIN)


@pytest.mark.parametrize("name, arguments, kind", [
    ("msrvtt", {"test_csv": MSRVTT_TEST}, "retrieval"),
    ("didemo", {"data_json": DIDEMO, "mode": "segment"}, "retrieval"),
    ("msrvtt_mc", {"mc_csv": MSRVTT_MC}, "mc"),
    ("webvid", {"csv_file": WEBVID}, "retrieval"),
])
def test_convert_output_loads_as_json_list(tmp_path, name, arguments, kind):
    out = tmp_path / f"{name}.json"
    summary = convert(name, out, **arguments)
    records = load_annotations(out, kind=kind)
    assert summary["records"] == len(records) > 0
    assert records == get_converter(name)(**arguments)


def test_convert_msvd_writes_answer_vocabulary_from_training_file(tmp_path):
    out = tmp_path / "msvd" / "test.json"
    summary = convert("msvd_qa", out, qa_json=MSVD_TEST, mapping=MSVD_MAPPING,
                      train_qa=MSVD_TRAIN, top_k="3")
    answers = out.parent / "answers.json"
    assert summary["side_files"] == {"answers.json": str(answers)}
    assert json.loads(answers.read_text()) == ["man", "animal", "play"]
    assert len(load_annotations(out, kind="qa")) == 2

    summary = convert("msvd_qa", tmp_path / "plain" / "train.json", qa_json=MSVD_TRAIN,
                      mapping=MSVD_MAPPING, top_k=0)
    assert summary["side_files"] == {} and not (tmp_path / "plain" / "answers.json").exists()


def test_convert_kinetics_writes_classes(tmp_path):
    out = tmp_path / "k400" / "train.jsonl"
    summary = convert("kinetics", out, csv_file=KINETICS, split="train")
    assert summary["records"] == 3 and summary["skipped"] == {"split is not 'train'": 1}
    assert json.loads((out.parent / "classes.json").read_text()) == [
        "abseiling", "air drumming", "passing American football (in game)"]
    assert load_annotations(out, kind="classification")[0] == {
        "video": "-3B32lodo2M_000059_000069.mp4", "label": "abseiling"}


def test_convert_refuses_empty_output_and_side_file_clash(tmp_path):
    copy = shutil.copy(MSRVTT_DATA, tmp_path / "MSRVTT_data.json")
    data = json.loads(Path(copy).read_text())
    for sentence in data["sentences"]:
        sentence["caption"] = ""
    Path(copy).write_text(json.dumps(data))
    with pytest.raises(ConversionError, match=r"no msrvtt record produced .*; skipped: 9 x empty caption"):
        convert("msrvtt", tmp_path / "out.json", data_json=copy)
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="overwritten by the side file"):
        convert("kinetics", tmp_path / "classes.json", csv_file=KINETICS)
