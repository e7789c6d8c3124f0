"""The HF rollout backend's batched call (videor1.rollout.hf.generate_batch): a whole step's requests
(ordered and shuffled, videos and images, prompts of different lengths) in one generate call with
one prefill per request, sampling what one call per request samples."""

import os

import pytest
import torch

from videor1.config import Config
from videor1.model import load_model, load_processor
from videor1.policy import PolicyModule
from videor1.rollout import Request, generate, generate_batch, prepare_prompt, vision_token_ids
from videor1.session import special_ids


@pytest.fixture(scope="module")
def setup(tiny_ckpt, synth_data, synth_rows, synth_data_cfg):
    rows, data = synth_rows, synth_data_cfg
    processor = load_processor(tiny_ckpt)
    videos = [r for r in rows if r["data_type"] == "video"][:2]
    image = next(r for r in rows if r["data_type"] == "image")
    prompts = [prepare_prompt(r, processor, data, os.path.dirname(synth_data), shuffled=r["data_type"] == "video",
                              generator=torch.Generator().manual_seed(i)) for i, r in enumerate([videos[0], image, videos[1]])]
    return tiny_ckpt, processor, prompts


def requests_of(prompts, dtype):
    """Every prompt's ordered request (3 rows), then the videos' shuffled ones (2 rows), pixels in dtype."""
    cast = lambda vis: {k: v.to(dtype) if k.startswith("pixel") else v for k, v in vis.items()}  # noqa: E731
    out = [Request(p, cast(p.vision), 3) for p in prompts]
    return out + [Request(p, cast(p.shuffled_vision), 2) for p in prompts if p.shuffled_vision is not None]


def test_one_call_equals_one_call_per_request_greedy_fp64(setup):
    ckpt, processor, prompts = setup
    model = PolicyModule(load_model(ckpt).double().eval(), kernel_backend="torch")
    requests = requests_of(prompts, torch.float64)
    assert len({r.prompt.input_ids.numel() for r in requests}) >= 2  # left padding is exercised
    cfg = Config().rollout
    cfg.max_completion_length, cfg.top_k = 10, 1  # greedy: the same tokens if and only if the same logits' argmax
    eos_ids, pad_id = special_ids(processor.tokenizer)
    suppress = vision_token_ids(processor.tokenizer)
    batch = generate_batch(model, requests, cfg, eos_ids, pad_id, suppress_ids=suppress)
    single = [generate(model, r.prompt, r.vision, r.num, cfg, eos_ids, pad_id, suppress_ids=suppress) for r in requests]
    assert [b[0].shape[0] for b in batch] == [r.num for r in requests]
    for (ids, mask), (one_ids, one_mask) in zip(batch, single):
        assert torch.equal(ids, one_ids) and torch.equal(mask, one_mask)
    # the shuffled frames really are other input: their greedy answers are not the ordered ones
    assert any(not torch.equal(batch[0][0][:2], b[0]) for b in batch[3:])


def test_one_generate_call_and_one_prefill_per_request(setup):
    ckpt, processor, prompts = setup
    hf = load_model(ckpt).eval()
    model = PolicyModule(hf, kernel_backend="torch")
    requests = requests_of(prompts, torch.float32)
    calls, prefills = [], []
    real_generate = hf.generate
    hf.generate = lambda **kw: calls.append(kw["input_ids"].shape) or real_generate(**kw)
    hook = hf.model.register_forward_hook(lambda m, a, kw, out: prefills.append(kw["input_ids"].shape), with_kwargs=True)
    cfg = Config().rollout
    cfg.max_completion_length = 6
    eos_ids, pad_id = special_ids(processor.tokenizer)
    torch.manual_seed(0)
    out = generate_batch(model, requests, cfg, eos_ids, pad_id, suppress_ids=vision_token_ids(processor.tokenizer))
    hook.remove()
    width = max(r.prompt.input_ids.numel() for r in requests)
    assert calls == [(sum(r.num for r in requests), width)]  # one call, every row, left-padded to the longest
    assert prefills[:len(requests)] == [(1, r.prompt.input_ids.numel() - 1) for r in requests]
    assert all(1 <= ids.shape[1] <= 6 and mask[:, 0].all() for ids, mask in out)
    assert generate_batch(model, [], cfg, eos_ids, pad_id) == []


def test_rollout_benchmark_quick_run(tmp_path):
    """benchmarks/bench_rollout.py --quick: a row per provider and metric; it asserts itself that every
    provider generated the same number of tokens (no EOS stops a row)."""
    import csv
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_rollout", os.path.join(repo, "benchmarks", "bench_rollout.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from videor1.rollout.vllm import DEFAULT_PYTHON

    with_vllm = os.path.exists(DEFAULT_PYTHON) or os.environ.get("VIDEOR1_REQUIRE_VLLM") == "1"
    with open(bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"] + ([] if with_vllm else ["--no-vllm"]))) as f:
        rows = list(csv.DictReader(f))
    names = ("hf-per-prompt", "hf-shared-prefill", "hf-batched") + (("vllm",) if with_vllm else ())
    expected = {(p, m) for p in names for m in ("time_ms", "tokens_per_s", "x_vs_hf_per_prompt")}
    if with_vllm:
        expected |= {(f"vllm-{t}", m) for t in ("shm", "gloo") for m in ("total_ms", "gather_ms", "send_ms", "load_ms")}
    assert {(r["provider"], r["metric"]) for r in rows} == expected
    assert all(float(r["p50"]) > 0 for r in rows)
