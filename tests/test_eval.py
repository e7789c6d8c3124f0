"""Evaluation: scoring rules (MRA for regression), the benchmark loaders, and an end-to-end run."""

import json
import os
import subprocess
import sys

import pytest

from videor1.data import DataError
from videor1.eval import BENCHMARKS, load_benchmark, mean_relative_accuracy, score, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_relative_accuracy_hand_computed():
    assert mean_relative_accuracy(10, 10) == 1.0
    # relative error 0.12: below 1 - t for t = 0.50 .. 0.85 (8 of 10 thresholds)
    assert mean_relative_accuracy(11.2, 10) == pytest.approx(0.8)
    assert mean_relative_accuracy(20, 10) == 0.0
    assert mean_relative_accuracy(10.4, 10) == pytest.approx(1.0)  # 0.04 < 0.05


def test_score_follows_video_r1_eval_rules():
    mc = {"problem_type": "multiple choice", "solution": "<answer>B</answer>"}
    assert score("<think>x</think><answer>B</answer>", mc) == 1.0
    assert score("B", mc) == 1.0  # no tags: the whole output is the answer
    assert score("<answer>C</answer>", mc) == 0.0
    reg = {"problem_type": "regression", "solution": "<answer>2.0</answer>"}
    # relative error 0.1 sits on the 0.90 threshold: in float32, as Video-R1 computes MRA, 0.2f / 2 is
    # 0.100000024, not below 1 - 0.9f = 0.100000024, so 8 of 10 thresholds (float64 would say 9)
    assert score("<answer>2.2</answer>", reg) == pytest.approx(0.8)
    assert score("<answer>fast</answer>", reg) == 0.0
    num = {"problem_type": "numerical", "solution": "<answer>3</answer>"}
    assert score("<answer>3</answer>", num) == 1.0 and score("<answer>3.0</answer>", num) == 0.0
    ocr = {"problem_type": "OCR", "solution": "<answer>HELLO WORLD</answer>"}
    assert score("<answer>HELLO</answer>", ocr) == 0.5


def test_summarize_groups_by_type_and_source():
    results = [
        {"problem_type": "multiple choice", "data_source": "a", "score": 1.0},
        {"problem_type": "multiple choice", "data_source": "b", "score": 0.0},
        {"problem_type": "regression", "data_source": "a", "score": 0.5},
    ]
    s = summarize(results)
    assert s["overall"] == pytest.approx(0.5) and s["n"] == 3
    assert s["by_type"]["multiple choice"] == (2, 0.5) and s["by_source"]["a"] == (2, 0.75)


# One row per benchmark in Video-R1's evaluation format (src/r1-v/Evaluation/eval_<name>.json):
# the shared fields plus that benchmark's own id and category fields.
BENCH_ROWS = {
    "mmvu": {"id": "validation_0", "subject": "Art"},
    "vsibench": {"id": "vsibench_1", "question_type": "object_counting", "dataset": "scannet"},
    "videommmu": {"id": "dev_1", "question_type": "Perception"},
    "mvbench": {"problem_id": 3, "task_type": "Action Sequence"},
    "tempcompass": {"problem_id": 4, "dim": "direction"},
    "videomme": {"problem_id": 5, "duration": "short"},
}


@pytest.mark.parametrize("bench", sorted(BENCHMARKS))
def test_benchmark_loaders_read_video_r1_eval_format(bench, tmp_path):
    base = {"data_type": "video", "path": f"/{bench}/videos/0.mp4", "problem_type": "multiple choice",
            "problem": "What happens?", "options": ["A. x", "B. y"], "solution": "<answer>A</answer>"}
    path = tmp_path / f"eval_{bench}.json"
    path.write_text(json.dumps([{**base, **BENCH_ROWS[bench]}, {**base, "problem_type": "regression",
                                                                  "options": [], "solution": "<answer>3.5</answer>"}]))
    rows = load_benchmark(str(path), bench)
    assert len(rows) == 2
    category = next(v for k, v in BENCH_ROWS[bench].items() if k in BENCHMARKS[bench])
    assert rows[0]["data_source"] == f"{bench}/{category}"
    assert rows[1]["data_source"] == bench  # no category field on that row
    assert rows[0]["process"] == "" and rows[1]["problem_id"] == 1
    if "problem_id" in BENCH_ROWS[bench]:
        assert rows[0]["problem_id"] == BENCH_ROWS[bench]["problem_id"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{k: v for k, v in base.items() if k != "solution"}]))
    with pytest.raises(DataError, match="missing field 'solution'"):
        load_benchmark(str(bad), bench)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark(str(path), "nope")


def test_eval_end_to_end_ordered_and_shuffled(tiny_ckpt, synth_data, tmp_path):
    """The untrained tiny model answers every row; scores are recomputable from the JSONL."""
    out = tmp_path / "res.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  fps: 8.0\n  video_min_pixels: 3136\n  video_max_pixels: 12544\n"
                   "  image_min_pixels: 3136\n  image_max_pixels: 12544\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for shuffled in (False, True):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "videor1.eval",
               "--model", tiny_ckpt, "--data", synth_data, "--config", str(cfg), "--max-new-tokens", "8", "--out", str(out)]
        proc = subprocess.run(cmd + (["--shuffle-frames"] if shuffled else []), env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(out) as f:
            results = [json.loads(line) for line in f]
        with open(synth_data) as f:
            rows = json.load(f)
        assert [r["problem_id"] for r in results] == [r["problem_id"] for r in rows]  # every row, in order
        for r in results:
            assert r["score"] == pytest.approx(score(r["output"], r))
            assert r["shuffled_frames"] is shuffled
        assert "overall" in proc.stdout and ("shuffled frames" in proc.stdout) is shuffled


class ScriptedModel:
    """Stands in for the HF model: answers with a fixed text and records the pixels it was shown."""

    def __init__(self, tokenizer, answer: str):
        import torch

        self.torch = torch
        self.answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
        self.config = type("Config", (), {"image_token_id": ids[0], "video_token_id": ids[1]})()
        self.seen = []
        self.token_types = []
        self.param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.param])

    def generate(self, input_ids, **kwargs):
        self.seen.append(kwargs.get("pixel_values_videos"))
        self.token_types.append((input_ids, kwargs.get("mm_token_type_ids")))
        return self.torch.cat([input_ids, self.answer_ids], dim=1)


def test_evaluate_scores_known_answers_and_shuffles_frames(tiny_ckpt, synth_data):
    import torch
    from transformers import AutoProcessor

    from videor1.config import Config
    from videor1.eval import evaluate

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    with open(synth_data) as f:
        rows = json.load(f)
    video_mc = [r for r in rows if r["data_type"] == "video" and r["problem_type"] == "multiple choice"][:1]
    assert video_mc
    data = Config().data
    data.fps, data.video_min_pixels, data.video_max_pixels = 8.0, 3136, 12544
    root = os.path.dirname(synth_data)
    letter = video_mc[0]["solution"].removeprefix("<answer>").removesuffix("</answer>")
    wrong = "A" if letter != "A" else "B"
    for answer, expected in ((letter, 1.0), (wrong, 0.0)):
        model = ScriptedModel(processor.tokenizer, f"<think>t</think><answer>{answer}</answer>")
        res = evaluate(model, processor, video_mc, data, root, progress=False)
        assert res[0]["score"] == expected and res[0]["prediction"] == answer
    ordered = ScriptedModel(processor.tokenizer, "x")
    shuffled = ScriptedModel(processor.tokenizer, "x")
    evaluate(ordered, processor, video_mc, data, root, progress=False)
    evaluate(shuffled, processor, video_mc, data, root, shuffle_frames=True, progress=False)
    # the video placeholders (and only they) are typed 2, so generate builds 3D M-RoPE positions
    ids, types = ordered.token_types[0]
    assert types is not None and int((types == 2).sum()) > 0
    assert torch.equal(types == 2, ids == ordered.config.video_token_id) and not bool((types == 1).any())
    a, b = ordered.seen[0], shuffled.seen[0]
    assert a.shape == b.shape and not torch.equal(a, b)
    # same frames, other order: the multiset of patch values is unchanged
    assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
