"""Video-R1-format datasets: load JSON / JSONL rows, validate them, resolve media paths.

A row (the Video-R1-260K schema):
    problem_id   int
    problem      str    the question
    data_type    str    "image" | "video"
    problem_type str    "multiple choice" | "numerical" | "OCR" | "free-form" | "regression"
    options      list[str]  ("A. ...", one per option; may be empty unless multiple choice)
    process      str    "<think>...</think>" chain of thought (SFT target)
    solution     str    "<answer>...</answer>"
    path         str    media path relative to the data root ("./...")
    data_source  str    the sub-dataset the row came from
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from videor1.prompts import PROBLEM_TYPES

ROW_FIELDS: dict[str, type] = {
    "problem_id": int,
    "problem": str,
    "data_type": str,
    "problem_type": str,
    "options": list,
    "process": str,
    "solution": str,
    "path": str,
    "data_source": str,
}
DATA_TYPES = ("image", "video")
_ANSWER_RE = re.compile(r"<answer>.*?</answer>", re.DOTALL)


class DataError(ValueError):
    """A data file or one of its rows is malformed; the message names the file, row and field."""


def validate_row(row: Any, where: str) -> dict:
    """Check one row against the schema; `where` (e.g. "train.json row 3") prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for name, typ in ROW_FIELDS.items():
        if name not in row:
            raise DataError(f"{where}: missing field '{name}'")
        value = row[name]
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise DataError(f"{where}: field '{name}' must be {typ.__name__}, got {type(value).__name__}")
    if row["data_type"] not in DATA_TYPES:
        raise DataError(f"{where}: field 'data_type' must be one of {DATA_TYPES}, got {row['data_type']!r}")
    if row["problem_type"] not in PROBLEM_TYPES:
        raise DataError(f"{where}: field 'problem_type' must be one of {PROBLEM_TYPES}, got {row['problem_type']!r}")
    if not all(isinstance(op, str) for op in row["options"]):
        raise DataError(f"{where}: field 'options' must be a list of strings")
    if row["problem_type"] == "multiple choice" and not row["options"]:
        raise DataError(f"{where}: field 'options' is empty for a multiple-choice problem")
    if not _ANSWER_RE.search(row["solution"]):
        raise DataError(f"{where}: field 'solution' has no <answer>...</answer>: {row['solution'][:80]!r}")
    if not row["path"]:
        raise DataError(f"{where}: field 'path' is empty")
    return row


def load_rows(path: str) -> list[dict]:
    """Load and validate every row of a Video-R1 JSON list (.json) or JSON-lines file (.jsonl)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    name = os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte {raw[e.start]:#04x} at byte offset {e.start} (line {line}) "
                        f"cannot be decoded ({e.reason}); re-encode the file as UTF-8") from None
    if path.endswith(".jsonl"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{name} line {lineno}: invalid JSON: {e}") from e
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: invalid JSON: {e}") from e
        if not isinstance(rows, list):
            raise DataError(f"{name}: expected a JSON list of rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{name}: no rows")
    return [validate_row(row, f"{name} row {i}") for i, row in enumerate(rows)]


def resolve_media_path(row: dict, data_root: str) -> str:
    """The absolute media path of a row: its relative `path` joined to the data root."""
    path = row["path"]
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(data_root, path))


def extract_answer(text: str) -> str:
    """The text between <answer> and </answer> (stripped), or "" when absent (Video-R1's rule)."""
    match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
    return match.group(1).strip() if match else ""
