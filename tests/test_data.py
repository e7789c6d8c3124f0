import json

import pytest

from videor1.data import DataError, extract_answer, load_rows, resolve_media_path
from videor1.prompts import build_messages, build_prompt_text, build_question

ROW = {
    "problem_id": 7,
    "problem": "Which way does the red square move?\n",
    "data_type": "video",
    "problem_type": "multiple choice",
    "options": ["A. left", "B. right", "C. up", "D. down"],
    "process": "<think>It starts on the left and ends on the right.</think>",
    "solution": "<answer>B</answer>",
    "path": "./videos/7.mp4",
    "data_source": "synthetic/motion_direction",
}


def _write(tmp_path, rows, name="d.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def test_load_json_and_jsonl(tmp_path):
    assert load_rows(_write(tmp_path, [ROW]))[0]["problem_id"] == 7
    assert load_rows(_write(tmp_path, [ROW, ROW], "d.jsonl"))[1]["solution"] == "<answer>B</answer>"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_rows(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("field", ["problem_id", "problem", "data_type", "options", "solution", "path", "data_source"])
def test_missing_field_is_named(tmp_path, field):
    bad = dict(ROW)
    del bad[field]
    with pytest.raises(DataError, match=rf"d\.json row 1: missing field '{field}'"):
        load_rows(_write(tmp_path, [ROW, bad]))


@pytest.mark.parametrize(
    "field, value, msg",
    [
        ("data_type", "audio", "data_type"),
        ("problem_type", "essay", "problem_type"),
        ("problem_id", "7", "problem_id"),
        ("problem_id", True, "problem_id"),
        ("options", [], "options"),
        ("solution", "B", "solution"),
        ("path", "", "path"),
    ],
)
def test_bad_field_is_named(tmp_path, field, value, msg):
    bad = dict(ROW, **{field: value})
    with pytest.raises(DataError, match=msg):
        load_rows(_write(tmp_path, [bad]))


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2"):
        load_rows(str(path))


def test_resolve_and_extract():
    assert resolve_media_path(ROW, "/data/root") == "/data/root/videos/7.mp4"
    assert extract_answer("<think>x</think> <answer>  42 </answer>") == "42"
    assert extract_answer("no tags") == ""


def test_prompt_matches_video_r1_construction():
    # Video-R1 grpo.py: problem + "Options:\n" + each option + "\n", then QUESTION_TEMPLATE + TYPE_TEMPLATE.
    q = build_question(ROW)
    assert q == "Which way does the red square move?\nOptions:\nA. left\nB. right\nC. up\nD. down\n"
    text = build_prompt_text(ROW)
    assert text.startswith(q + "\nPlease think about this question as if you were a human pondering deeply.")
    assert text.endswith("Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    numeric = dict(ROW, problem_type="numerical", options=[])
    assert build_question(numeric) == ROW["problem"]
    msgs = build_messages(ROW)
    assert msgs[0]["content"][0] == {"type": "video"} and msgs[0]["content"][1]["text"] == text
