import json
import subprocess
import sys

from leanvl.cli import main
from leanvl.data.annotations import load_annotations
from leanvl.data.check import check_annotations
from leanvl.data.video import write_video
from tests.conftest import ramp_frames, truncated_faststart_mp4


def _broken_folder(root):
    for name in ("good1.mp4", "good2.mp4", "whole.mp4"):
        write_video(root / name, ramp_frames(16, 64, 64), fps=8)
    data = (root / "whole.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "zero.mp4").write_bytes(b"")
    records = [
        {"video": "good1.mp4", "caption": "fine"},
        {"video": "truncated.mp4", "caption": "cut in half"},
        {"video": "zero.mp4", "caption": "zero bytes"},
        {"video": "missing.mp4", "caption": "not there"},
        {"video": "good2.mp4", "caption": 42},  # malformed record
        {"video": "good2.mp4", "caption": "fine too"},
    ]
    path = root / "anno.json"
    path.write_text(json.dumps(records))
    return path


def test_check_lists_all_four_problems_by_name_and_exits_non_zero(tmp_path, capsys):
    anno = _broken_folder(tmp_path)
    clean = tmp_path / "clean.jsonl"
    code = main(["data", "check", str(anno), "--root", str(tmp_path), "--workers", "2",
                 "--quiet", "--clean-out", str(clean)])
    out = capsys.readouterr().out
    assert code == 1
    for name, problem in [("truncated.mp4", "undecodable"), ("zero.mp4", "empty file"),
                          ("missing.mp4", "missing file"), ("record 4", "malformed record")]:
        line = next(line for line in out.splitlines() if name in line)
        assert problem in line, line
    assert "field 'caption'" in out and "4 problems" in out
    assert [r["caption"] for r in load_annotations(clean)] == ["fine", "fine too"]


def test_truncated_with_index_up_front_is_reported_as_truncated(tmp_path):
    # A file whose header survives but whose frames were cut off.
    truncated_faststart_mp4(tmp_path / "cut.mp4", size=64, frames=48)
    (tmp_path / "a.json").write_text(json.dumps([{"video": "cut.mp4", "caption": "x"}]))
    report = check_annotations(tmp_path / "a.json", tmp_path, workers=1, progress=False)
    assert [p.kind for p in report.problems] == ["truncated"]
    assert "of 48 frames decode" in report.problems[0].detail


def test_clean_folder_passes_and_too_short_is_reported(tmp_path):
    write_video(tmp_path / "a.mp4", ramp_frames(8, 32, 32), fps=8)
    (tmp_path / "a.json").write_text(json.dumps([{"video": "a.mp4", "caption": "x"}]))
    assert check_annotations(tmp_path / "a.json", tmp_path, workers=1, progress=False).ok
    report = check_annotations(tmp_path / "a.json", tmp_path, workers=1, min_frames=9,
                               progress=False)
    assert [p.kind for p in report.problems] == ["too short"]
    result = subprocess.run([sys.executable, "-m", "leanvl", "data", "check", str(tmp_path / "a.json"),
                             "--root", str(tmp_path), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0 and "no problems" in result.stdout
