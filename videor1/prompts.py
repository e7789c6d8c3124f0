"""Video-R1's prompt templates (verbatim) and the chat message built from a dataset row.

The strings are Video-R1's (src/r1-v/src/open_r1/grpo.py): the reasoning instruction and one answer
instruction per problem type. A multiple-choice question is the problem, then "Options:" and one
option per line, exactly as Video-R1 builds it.
"""

from __future__ import annotations

from typing import Any, Mapping

QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)

TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
    "<answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the "
    "<answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}

PROBLEM_TYPES = tuple(TYPE_TEMPLATE)

# Video-R1's evaluation prompt (src/eval_bench.py), verbatim: the reasoning instruction differs from
# training's in one place ("between the <think> and </think> tags ... between the <answer> and
# </answer> tags"); the answer instruction per problem type is TYPE_TEMPLATE's, unchanged.
EVAL_QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
    "between the <answer> and </answer> tags."
)
EVAL_TEMPLATE_KEY = "prompt_template"
"""A row whose "prompt_template" field is "video-r1-eval" is asked with EVAL_QUESTION_TEMPLATE
(videor1.eval sets it under --protocol video-r1); every other row gets the training prompt."""


def build_question(row: Mapping[str, Any]) -> str:
    """The question text of a row: for multiple choice, the options follow, one per line."""
    if row["problem_type"] == "multiple choice":
        return row["problem"] + "Options:\n" + "".join(op + "\n" for op in row["options"])
    return row["problem"]


def build_prompt_text(row: Mapping[str, Any]) -> str:
    """The user text of a row: question + reasoning instruction + the answer instruction of its type."""
    template = EVAL_QUESTION_TEMPLATE if row.get(EVAL_TEMPLATE_KEY) == "video-r1-eval" else QUESTION_TEMPLATE
    return template.format(Question=build_question(row)) + TYPE_TEMPLATE[row["problem_type"]]


def build_messages(row: Mapping[str, Any]) -> list[dict]:
    """The chat messages (one user turn: the image or video, then the text) for the processor's template."""
    return [
        {
            "role": "user",
            "content": [{"type": row["data_type"]}, {"type": "text", "text": build_prompt_text(row)}],
        }
    ]


def build_sft_target(row: Mapping[str, Any]) -> str:
    """The assistant turn of CoT SFT: the row's reasoning then its answer, as Video-R1's SFT data."""
    return row["process"] + "\n" + row["solution"]
