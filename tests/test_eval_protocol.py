"""Video-R1's evaluation protocol (src/eval_bench.py) and the resumable multi-benchmark runner.

The expected values below are computed by hand from Video-R1's rules, transcribed here:
  prompt      QUESTION_TEMPLATE of eval_bench.py ("... between the <think> and </think> tags, and then
              give your final answer between the <answer> and </answer> tags.") + TYPE_TEMPLATE[type]
  answer      extract_answer(output), or the whole output when that is ""
  MC          1.0 if answer.strip() == gt.strip() else 0.0
  numerical   0.0 if ("." or "," in gt) != ("." or "," in answer); else round(float, 2) equal -> 1.0
  regression  MRA: mean over t in arange(0.5, 0.975, 0.05) (float32) of |o - g| / (|g| + 1e-8) < 1 - t
  else        0.0 (OCR, free-form)
  mean_acc    mean reward over rows whose problem_type is not regression; mean_mra over regression rows
  sampling    temperature 0.1, top_p 0.001, max_tokens 1024
"""

import json
import os
import subprocess
import sys

import pytest

from videor1 import eval as ev
from videor1.prompts import build_prompt_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VIDEO_R1_EVAL_PROMPT = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
    "between the <answer> and </answer> tags."
)


def test_eval_prompt_is_video_r1s_per_problem_type():
    mc = {"problem_type": "multiple choice", "problem": "Which?", "options": ["A. x", "B. y"],
          "prompt_template": "video-r1-eval"}
    assert build_prompt_text(mc) == VIDEO_R1_EVAL_PROMPT.format(Question="Which?Options:\nA. x\nB. y\n") + (
        " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    reg = {"problem_type": "regression", "problem": "How far?", "options": [], "prompt_template": "video-r1-eval"}
    assert build_prompt_text(reg) == VIDEO_R1_EVAL_PROMPT.format(Question="How far?") + (
        " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.")
    # the training prompt is unchanged for rows without the key
    assert "between the <think> </think> tags" in build_prompt_text({**reg, "prompt_template": None})


@pytest.mark.parametrize("ptype,solution,output,expected", [
    ("multiple choice", "<answer>B</answer>", "<think>t</think><answer>B</answer>", 1.0),
    ("multiple choice", "<answer>B</answer>", "  B \n", 1.0),  # no tags: the whole output, stripped
    ("multiple choice", "<answer>B</answer>", "<answer>B.</answer>", 0.0),
    ("numerical", "<answer>3</answer>", "<answer>3</answer>", 1.0),
    ("numerical", "<answer>3</answer>", "<answer>3.0</answer>", 0.0),  # one side has a decimal point
    ("numerical", "<answer>1,000</answer>", "<answer>1000.001</answer>", 1.0),  # both "decimal", 1000.0 == 1000.0
    ("numerical", "<answer>2.5</answer>", "<answer>2.51</answer>", 0.0),
    ("regression", "<answer>10</answer>", "<answer>11.2</answer>", 0.8),  # rel 0.12 < 1-t for t <= 0.85
    ("regression", "<answer>10</answer>", "<answer>10.4</answer>", 1.0),
    ("regression", "<answer>10</answer>", "<answer>20</answer>", 0.0),
    ("regression", "<answer>2.0</answer>", "<answer>2.2</answer>", 0.8),  # float32 tie at t = 0.9
    ("regression", "<answer>10</answer>", "<answer>nan</answer>", 0.0),
    ("regression", "<answer>10</answer>", "<answer>far</answer>", 0.0),
    ("OCR", "<answer>HELLO</answer>", "<answer>HELLO</answer>", 0.0),  # OCR and free-form score 0 there
    ("free-form", "<answer>a cat</answer>", "<answer>a cat</answer>", 0.0),
])
def test_score_video_r1(ptype, solution, output, expected):
    assert ev.score_video_r1(output, {"problem_type": ptype, "solution": solution}) == pytest.approx(expected)


def test_summary_reports_mean_acc_and_mean_mra_separately_and_failed_rows():
    rows = [
        {"problem_type": "multiple choice", "data_source": "b", "score": 1.0},
        {"problem_type": "multiple choice", "data_source": "b", "score": 0.0, "error": "cannot decode",
         "path": "./v/bad.mp4", "problem_id": 7},
        {"problem_type": "OCR", "data_source": "b", "score": 0.0},
        {"problem_type": "regression", "data_source": "b", "score": 0.8},
        {"problem_type": "regression", "data_source": "b", "score": 0.4},
    ]
    s = ev.summarize(rows)
    assert s["mean_acc"] == pytest.approx(1 / 3) and s["n_acc"] == 3  # the failed row counts as wrong
    assert s["mean_mra"] == pytest.approx(0.6) and s["n_mra"] == 2
    assert s["n_failed"] == 1 and s["failed"] == [{"problem_id": 7, "path": "./v/bad.mp4", "error": "cannot decode"}]
    only_mc = ev.summarize(rows[:1])
    assert only_mc["mean_mra"] == 0.0 and only_mc["n_mra"] == 0  # Video-R1 reports 0.0 without regression rows


def test_protocol_settings():
    s = ev.protocol_settings("video-r1", frames=32)
    d = s["data"]
    assert (s["max_new_tokens"], s["sampling"]) == (1024, "video-r1")
    assert (d.fps, d.min_frames, d.max_frames) == (2.0, 4, 32)
    assert (d.video_min_pixels, d.video_max_pixels) == (128 * 28 * 28, 256 * 28 * 28)
    assert (d.image_min_pixels, d.image_max_pixels) == (4 * 28 * 28, 256 * 28 * 28)
    if hasattr(d, "video_pixels"):
        assert (d.video_pixels, d.second_per_grid_ts) == ("qwen_vl_utils", "fps")
    assert ev.protocol_settings("video-r1")["data"].max_frames == 16
    o = ev.protocol_settings("ours")
    assert (o["max_new_tokens"], o["sampling"]) == (256, "greedy")
    assert ev.protocol_settings("video-r1", max_new_tokens=8)["max_new_tokens"] == 8
    assert ev.summary_path("x/res.jsonl") == "x/res.summary.json"
    with pytest.raises(ValueError):
        ev.protocol_settings("nope")


class Answerer:
    """Stands in for the HF model: answers a numerical value to "numerical value" prompts and a
    letter otherwise; records each batch's prompt texts and generation config."""

    def __init__(self, tokenizer, letter="A", number="11.2"):
        import torch

        self.torch, self.tok = torch, tokenizer
        self.letter, self.number = letter, number
        ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
        self.config = type("Config", (), {"image_token_id": ids[0], "video_token_id": ids[1]})()
        self.prompts, self.configs = [], []
        self.param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.param])

    def generate(self, input_ids, attention_mask, generation_config=None, **kwargs):
        self.configs.append(generation_config)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[mask.bool()].tolist())
            self.prompts.append(text)
            ans = self.number if "numerical value (e.g., 42" in text else self.letter
            rows.append(self.tok(f"<think>t</think><answer>{ans}</answer><|im_end|>", add_special_tokens=False,
                                 return_tensors="pt")["input_ids"][0])
        width = max(len(r) for r in rows)
        pad = self.tok.convert_tokens_to_ids("<|endoftext|>")
        out = self.torch.full((len(rows), width), pad, dtype=self.torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return self.torch.cat([input_ids, out], dim=1)


# Benchmark-specific fields of Video-R1's eval_<name>.json rows (besides data_type, path,
# problem_type, problem, options, solution).
BENCH_FIELDS = {
    "vsibench": {"id": "vsibench_1", "question_type": "object_counting", "dataset": "scannet"},
    "videommmu": {"id": "dev_1", "question_type": "Perception"},
    "mmvu": {"id": "validation_0", "subject": "Art"},
    "mvbench": {"problem_id": 3, "task_type": "Action Sequence"},
    "tempcompass": {"problem_id": 4, "dim": "direction"},
    "videomme": {"problem_id": 5, "duration": "short"},
}


def _bench_rows(synth_data, bench, video):
    """Four rows: MC answered right (solution A), MC wrong (B), regression 10 (MRA of 11.2: 0.8), and
    a row whose video does not exist."""
    base = {"data_type": "video", "path": video, "problem": "What happens? ", "options": ["A. x", "B. y"],
            **BENCH_FIELDS[bench]}
    return [
        {**base, "problem_type": "multiple choice", "solution": "<answer>A</answer>"},
        {**base, "problem_type": "multiple choice", "solution": "<answer>B</answer>"},
        {**base, "problem_type": "regression", "options": [], "problem": "How many?",
         "solution": "<answer>10</answer>"},
        {**base, "problem_type": "multiple choice", "path": "./missing/none.mp4", "solution": "<answer>A</answer>"},
    ]


@pytest.fixture
def bench_dir(synth_data, tmp_path):
    with open(synth_data) as f:
        video = next(r["path"] for r in json.load(f) if r["data_type"] == "video")
    d = tmp_path / "Evaluation"
    d.mkdir()
    for bench in BENCH_FIELDS:
        (d / f"eval_{bench}.json").write_text(json.dumps(_bench_rows(synth_data, bench, video)))
    return str(d)


def test_evaluate_under_video_r1_protocol(tiny_ckpt, synth_data, bench_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    rows = ev.load_benchmark(os.path.join(bench_dir, "eval_vsibench.json"), "vsibench")
    s = ev.protocol_settings("video-r1", frames=4)
    model = Answerer(processor.tokenizer)
    res = ev.evaluate(model, processor, rows, s["data"], os.path.dirname(synth_data), progress=False,
                      max_new_tokens=s["max_new_tokens"], sampling=s["sampling"], protocol="video-r1")
    assert [r["score"] for r in res] == pytest.approx([1.0, 0.0, 0.8, 0.0])
    assert res[3]["failed"] and "error" in res[3] and not res[0].get("failed")
    cfg = model.configs[0]
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p) == (1024, True, 0.1, 0.001)
    assert all("between the <think> and </think> tags" in p for p in model.prompts)
    summary = ev.summarize(res)
    assert summary["mean_acc"] == pytest.approx(1 / 3) and summary["mean_mra"] == pytest.approx(0.8)
    assert summary["n_failed"] == 1


def test_suite_runs_resumes_and_prints_video_r1_table(tiny_ckpt, synth_data, bench_dir, tmp_path, capsys):
    from transformers import AutoProcessor

    from videor1 import eval_suite as suite

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    out = tmp_path / "out"
    out.mkdir()
    # an interrupted earlier run: row 0 answered in the merged file, then a torn line; row 1 in a
    # part file of a rank that this run does not have
    kept = {"row_index": 0, "problem_type": "multiple choice", "data_source": "vsibench/object_counting",
            "score": 1.0, "output": "earlier", "path": "p"}
    (out / "vsibench.jsonl").write_text(json.dumps(kept) + "\n" + '{"row_index": 1, "sco')
    (out / "vsibench.rank3.jsonl").write_text(json.dumps({**kept, "row_index": 1, "score": 0.0}) + "\n")
    model = Answerer(processor.tokenizer)
    kwargs = dict(out_dir=str(out), eval_dir=bench_dir, data_root=os.path.dirname(synth_data), frames=4,
                  model=model, processor=processor, quiet=True)
    result = suite.run_suite(tiny_ckpt, list(BENCH_FIELDS), **kwargs)
    # vsibench: rows 0 and 1 were not asked again; every other benchmark: 3 decodable rows asked
    assert len(model.prompts) == 1 + 3 * 5
    for bench in BENCH_FIELDS:
        assert not os.path.exists(out / f"{bench}.rank0.jsonl")
        lines = (out / f"{bench}.jsonl").read_text().splitlines()
        assert [json.loads(x)["row_index"] for x in lines] == [0, 1, 2, 3]
        s = json.loads((out / f"{bench}.summary.json").read_text())
        assert s["n"] == 4 and s["n_failed"] == 1 and s["mean_mra"] == pytest.approx(0.8)
        assert s["mean_acc"] == pytest.approx(1 / 3)
        assert s["overall"] == pytest.approx((1 + 0.8) / 4)
    assert json.loads((out / "vsibench.jsonl").read_text().splitlines()[0])["output"] == "earlier"
    assert not os.path.exists(out / "vsibench.rank3.jsonl")
    table = result["table"]
    header = table.splitlines()[0]
    cols = [c.strip() for c in header.split("|")]
    assert cols[1:] == ["VSI-Bench", "VideoMMMU", "MMVU", "MVBench", "TempCompass", "VideoMME", "Mean"]
    assert table.splitlines()[2].split("|")[-1].strip() == "45.0"
    assert json.loads((out / "summary.json").read_text())["table"] == table
    # everything answered: a second run asks nothing
    again = Answerer(processor.tokenizer)
    suite.run_suite(tiny_ckpt, list(BENCH_FIELDS), **{**kwargs, "model": again})
    assert again.prompts == []
    # other settings in the same folder are refused
    with pytest.raises(SystemExit, match="other settings"):
        suite.run_suite(tiny_ckpt, ["mmvu"], **{**kwargs, "frames": 8})


def test_suite_distributed_with_tiny_checkpoint(tiny_ckpt, synth_data, bench_dir, tmp_path):
    """Two ranks over the tiny model, then a resume after a lost row: the row is answered again, the rest kept."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "videor1.eval_suite", "--model", tiny_ckpt, "--eval-dir", bench_dir, "--benchmarks", "mmvu,vsibench",
           "--data-root", os.path.dirname(synth_data), "--out-dir", str(out), "--frames", "4",
           "--max-new-tokens", "4", "--batch-size", "2"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "VSI-Bench" in proc.stdout and "MMVU" in proc.stdout and "4 to answer over 2 rank(s)" in proc.stdout
    lines = (out / "mmvu.jsonl").read_text().splitlines()
    assert [json.loads(x)["row_index"] for x in lines] == [0, 1, 2, 3]
    first = [json.loads(x) for x in lines]
    (out / "mmvu.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # lose row 2
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mmvu: 4 rows, 3 already answered, 1 to answer" in proc.stdout
    assert "vsibench: 4 rows, 4 already answered, 0 to answer" in proc.stdout
    again = [json.loads(x) for x in (out / "mmvu.jsonl").read_text().splitlines()]
    assert [r["row_index"] for r in again] == [0, 1, 2, 3]
    for r in again:
        assert r["score"] == pytest.approx(ev.score_video_r1(r["output"], r))
    assert again[0]["output"] == first[0]["output"]
    s = json.loads((out / "mmvu.summary.json").read_text())
    assert s["n_failed"] == 1 and s["settings"]["max_new_tokens"] == 4
