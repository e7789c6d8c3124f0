"""The shared-prefix forward (videor1.forward) equals the repeated one: attention, positions, hidden
states, loss, metrics, log-probs and every parameter gradient, in fp64 (<= 1e-10) and fp32 (<= 1e-5),
images and videos, completions of different lengths with padding, beta 0 and > 0; the vision tower
runs once per group; rollouts prefill once and sample what per-row prefills sample."""

import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import reference_linear_grpo_loss
from videor1.config import Config
from videor1.forward import PrefixLayout, build_inputs, shared_prefix
from videor1.forward.attention import install, installed, two_pass_attention
from videor1.model import load_model, load_processor
from videor1.mrope import position_ids_for
from videor1.policy import PolicyModule
from videor1.rollout import generate, prepare_prompt, vision_token_ids
from videor1.session import special_ids

LENGTHS = [7, 3, 5, 1]  # completions of different lengths: padding after each EOS, one of a single token


def naive_prefix_attention(q, k, v, layout):
    """Every query over its allowed keys (the rule spelled out element by element), fp64 softmax."""
    P, L = layout.prompt_len, layout.total_len
    block = torch.full((L,), -1)
    for b, (start, n) in enumerate(zip(layout.block_starts(), layout.block_lengths)):
        block[start:start + n] = b
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    allowed = torch.where(i < P, j <= i, (j < P) | ((block[:, None] == block[None]) & (j <= i)))
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ kk.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("P,G,C,H,Hkv,lengths", [
    (9, 3, 4, 4, 2, None), (1, 1, 1, 2, 2, None), (17, 5, 1, 6, 3, None), (2, 2, 13, 4, 1, None),
    (9, 4, 6, 4, 2, (6, 1, 3, 5)), (3, 3, 7, 2, 1, (1, 1, 7)), (5, 2, 4, 4, 4, (4, 4))])
def test_two_pass_attention_equals_the_masked_rule(P, G, C, H, Hkv, lengths):
    g = torch.Generator().manual_seed(P * 100 + C)
    layout = PrefixLayout(P, G, C, lengths)
    q, k, v = (torch.randn(1, h, layout.total_len, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (H, Hkv, Hkv))
    out, ref = two_pass_attention(q, k, v, layout), naive_prefix_attention(q, k, v, layout)
    assert out.shape == (1, layout.total_len, H, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # fp32 and bf16 as the model runs them, against the fp64 rule
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        low = two_pass_attention(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype), layout)
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), ref.detach(), rtol=0, atol=tol)


def test_layout_predictors_and_bad_shapes():
    layout = PrefixLayout(5, 2, 3)
    # token 0 of each completion from the prompt's last position; token j from the completion's j - 1
    assert layout.predictor_index().tolist() == [[4, 5, 6], [4, 8, 9]]
    ragged = PrefixLayout(5, 3, 3, (3, 1, 2))  # blocks at 5..7, 8, 9..10; past a block's end: P - 1
    assert ragged.total_len == 11 and ragged.block_starts() == [5, 8, 9]
    assert ragged.predictor_index().tolist() == [[4, 5, 6], [4, 4, 4], [4, 9, 4]]
    index, rows = ragged.block_index()
    assert index.tolist() == [[5, 6, 7], [8, 8, 8], [9, 10, 10]]
    assert rows.tolist() == [0, 1, 2, 3, 6, 7]  # the packed tokens among the [3 x 3] batch's rows
    assert PrefixLayout(5, 2, 3, (3, 3)).lengths is None  # every block full: the uniform layout
    with pytest.raises(ValueError, match="lengths must be 2 values in 1..3"):
        PrefixLayout(5, 2, 3, (3, 0))
    with pytest.raises(ValueError, match="packed group of 11 tokens"):
        two_pass_attention(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4), layout)
    with pytest.raises(ValueError, match="needs a prompt"):
        PrefixLayout(0, 2, 3)
    with pytest.raises(ValueError, match="completion_ids and mask"):
        shared_prefix.pack(torch.zeros(4, dtype=torch.long), {}, torch.zeros(2, 3, dtype=torch.long),
                           torch.zeros(2, 4, dtype=torch.long))


@contextlib.contextmanager
def norms_in_input_dtype():
    """Qwen2.5-VL's RMSNorm and vision rotary cast to float32 (a downcast for fp64 inputs), which
    rounds the two forms' differently summed gradients to fp32; for the fp64 comparison they run in
    the input's dtype (float32 and bf16 inputs are computed as transformers does)."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qm

    norm, rotary = qm.Qwen2_5_VLRMSNorm.forward, qm.apply_rotary_pos_emb_vision

    def norm_forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def rotary_forward(q, k, cos, sin):
        if q.dtype != torch.float64:
            return rotary(q, k, cos, sin)
        cos, sin = cos.unsqueeze(-2).double(), sin.unsqueeze(-2).double()
        return q * cos + qm.rotate_half(q) * sin, k * cos + qm.rotate_half(k) * sin

    qm.Qwen2_5_VLRMSNorm.forward, qm.apply_rotary_pos_emb_vision = norm_forward, rotary_forward
    try:
        yield
    finally:
        qm.Qwen2_5_VLRMSNorm.forward, qm.apply_rotary_pos_emb_vision = norm, rotary


@pytest.fixture(scope="module")
def setup(tiny_ckpt, synth_data, synth_rows, synth_data_cfg):
    rows, data = synth_rows, synth_data_cfg
    processor = load_processor(tiny_ckpt)
    prompts = {t: prepare_prompt(next(r for r in rows if r["data_type"] == t), processor, data,
                                 os.path.dirname(synth_data), shuffled=False) for t in ("video", "image")}
    return tiny_ckpt, processor, prompts


def group(prompt, dtype, seed=1):
    """A prompt (pixels in `dtype`) with G = len(LENGTHS) completions right-padded after their ends."""
    g = torch.Generator().manual_seed(seed)
    G, C = len(LENGTHS), max(LENGTHS)
    mask = (torch.arange(C)[None] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(10, 700, (G, C), generator=g).masked_fill(mask == 0, 0)
    prompt.vision = {k: v.to(dtype) if k.startswith("pixel") else v for k, v in prompt.vision.items()}
    adv = torch.randn(G, generator=g, dtype=torch.float64)
    ref = -3 + 0.5 * torch.randn(G, C, generator=g, dtype=torch.float64)
    old = -3 + 0.5 * torch.randn(G, C, generator=g, dtype=torch.float64)
    return ids, mask, adv, ref, old


def inputs_of(form, prompt, ids, mask):
    """"repeated" (G sequences), "ragged" (packed, real tokens only: the default) or "padded" (packed,
    every completion's C slots)."""
    if form == "repeated":
        return build_inputs(prompt, ids, mask, shared=False)
    return shared_prefix.pack(prompt.input_ids, prompt.vision, ids, mask, ragged=form == "ragged")


def run(model, head, prompt, ids, mask, form):
    """(hidden [G, C, H], loss, metrics, {name: grad}) of one form."""
    model.zero_grad(set_to_none=True)
    P = prompt.input_ids.numel()
    hidden = PolicyModule(model).completion_hidden(inputs_of(form, prompt, ids, mask), P, ids.shape[1])
    loss, metrics = head(hidden)
    loss.backward()
    return hidden.detach(), loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, mask, tol):
    ha, hb = a[0][mask.bool()], b[0][mask.bool()]
    assert (ha - hb).abs().max() <= tol * ha.abs().max()
    assert abs(float(a[1] - b[1])) <= tol * max(1.0, abs(float(a[1])))
    for key in a[2]:
        assert abs(float(a[2][key]) - float(b[2][key])) <= tol * max(1.0, abs(float(a[2][key]))), key
    assert a[3].keys() == b[3].keys()
    worst = max(float((a[3][n] - b[3][n]).norm() / a[3][n].norm()) for n in a[3])
    assert worst <= tol, worst
    vision = [n for n in a[3] if ".visual." in n]
    assert vision and all(a[3][n].abs().sum() > 0 for n in vision)  # the vision tower is in the comparison


@pytest.mark.parametrize("data_type", ["video", "image"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_fp64_loss_metrics_and_every_gradient_equal_the_repeated_forward(setup, data_type, beta):
    ckpt, _, prompts = setup
    prompt = prompts[data_type]
    ids, mask, adv, ref, old = group(prompt, torch.float64)
    with norms_in_input_dtype():
        model = load_model(ckpt).double().train()
        weight = model.lm_head.weight

        def head(hidden):  # the fp64 oracle head (kernels.reference), both ratios and the KL live
            return reference_linear_grpo_loss(hidden, weight, ids, adv, mask, beta=beta, ref_logprobs=ref,
                                              old_logprobs=old)

        repeated, ragged, padded = (run(model, head, prompt, ids, mask, f) for f in ("repeated", "ragged", "padded"))
    assert_same(repeated, ragged, mask, 1e-10)
    assert_same(repeated, padded, mask, 1e-10)


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_fp32_policy_loss_logprobs_and_gradients_equal_through_the_kernels(setup, data_type):
    """PolicyModule end to end (the fused kernel, torch backend) in the model's own fp32."""
    ckpt, _, prompts = setup
    prompt = prompts[data_type]
    ids, mask, adv, ref, _ = group(prompt, torch.float32, seed=2)
    model = load_model(ckpt).train()
    policy = PolicyModule(model, kernel_backend="torch")
    P = prompt.input_ids.numel()
    out = {}
    for shared in (False, True):
        inputs = build_inputs(prompt, ids, mask, shared=shared)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            logp = policy(inputs, P, ids, mode="logprobs", completion_mask=mask)
        loss, m = policy(inputs, P, ids, mode="loss", advantages=adv.float(), completion_mask=mask,
                         loss_kwargs=dict(beta=0.04, ref_logprobs=ref.float()))
        loss.backward()
        out[shared] = (logp, loss.detach(), m, {n: p.grad.clone() for n, p in model.named_parameters()})
    a, b = out[False], out[True]
    assert (a[0] != 0).sum() == mask.sum()  # padding gets 0, counted tokens a real log-prob
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-6)
    for key in a[2]:
        torch.testing.assert_close(b[2][key], a[2][key], rtol=1e-5, atol=1e-6)
    worst = max(float((a[3][n] - b[3][n]).norm() / a[3][n].norm()) for n in a[3])
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("form", ["ragged", "padded"])
def test_positions_are_each_completions_own(setup, form):
    """Every completion token's M-RoPE position in the packed sequence is the one it has in its own
    sequence [prompt; c_i] (what position_ids_for gives the repeated form), not a running count."""
    ckpt, _, prompts = setup
    model = load_model(ckpt)
    prompt = prompts["video"]
    ids, mask, *_ = group(prompt, torch.float32)
    P, (G, C) = prompt.input_ids.numel(), ids.shape
    inputs = inputs_of(form, prompt, ids, mask)
    packed = shared_prefix.packed_position_ids(model.config, inputs)
    own = position_ids_for(model.config, build_inputs(prompt, ids, mask, shared=False))  # [3, G, P + C]
    layout = inputs["prefix_layout"]
    assert packed.shape == (3, 1, P + (sum(LENGTHS) if form == "ragged" else G * C))
    assert torch.equal(packed[:, 0, :P], own[:, 0, :P])
    for i, start in enumerate(layout.block_starts()):
        n = LENGTHS[i]
        assert torch.equal(packed[:, 0, start:start + n], own[:, i, P:P + n])
        assert torch.equal(inputs["input_ids"][0, start:start + n], ids[i, :n])
    # the completions start at max(prompt positions) + 1 on every axis (not at P: vision tokens share positions)
    assert packed[:, 0, P].tolist() == [int(own[:, 0, :P].max()) + 1] * 3 and int(packed[0, 0, P]) != P


def test_vision_tower_runs_once_per_group(setup):
    ckpt, _, prompts = setup
    model = load_model(ckpt)
    prompt = prompts["video"]
    ids, mask, *_ = group(prompt, torch.float32)
    rows = []
    hook = model.model.visual.register_forward_hook(lambda m, args, kw, out: rows.append(args[0].shape[0]),
                                                 with_kwargs=True)
    n = prompt.vision["pixel_values_videos"].shape[0]
    with torch.no_grad():
        for shared in (True, False):
            PolicyModule(model).completion_hidden(build_inputs(prompt, ids, mask, shared=shared),
                                                  prompt.input_ids.numel(), ids.shape[1])
    hook.remove()
    assert rows == [n, len(LENGTHS) * n]


def test_activation_checkpointing_keeps_gradients_exact(setup):
    ckpt, _, prompts = setup
    prompt = prompts["image"]
    ids, mask, adv, ref, _ = group(prompt, torch.float64, seed=3)
    with norms_in_input_dtype():
        model = load_model(ckpt).double().train()
        head = lambda h: reference_linear_grpo_loss(h, model.lm_head.weight, ids, adv, mask, beta=0.04,  # noqa: E731
                                                    ref_logprobs=ref)
        plain = run(model, head, prompt, ids, mask, "ragged")
        model.activation_checkpointing_enable()  # as the engines enable it (videor1.engine.build_engine)
        checkpointed = run(model, head, prompt, ids, mask, "ragged")
        repeated = run(model, head, prompt, ids, mask, "repeated")
    assert_same(plain, checkpointed, mask, 1e-12)
    assert_same(repeated, checkpointed, mask, 1e-10)


def test_installed_attention_leaves_other_forwards_and_saved_configs_alone(setup, tmp_path):
    ckpt, _, prompts = setup
    prompt = prompts["video"]
    model = load_model(ckpt)
    ids = prompt.input_ids[None]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.vision)
    from videor1.policy import with_mm_token_types

    with torch.no_grad():
        before = model(**with_mm_token_types(kwargs, model.config)).logits
        install(model)
        install(model)  # idempotent
        assert installed(model) and model.config.vision_config._attn_implementation == "sdpa"
        after = model(**with_mm_token_types(kwargs, model.config)).logits
    assert torch.equal(before, after)
    model.save_pretrained(tmp_path / "saved")
    assert "videor1" not in (tmp_path / "saved" / "config.json").read_text()
    with pytest.raises(ValueError, match="sliding-window"):
        other = load_model(ckpt)
        other.config.text_config.use_sliding_window = True
        install(other)


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_rollouts_prefill_once_and_sample_the_same(setup, data_type):
    """One prefill per prompt, its KV cache repeated to the G rows: the same tokens as G prefills
    (same seed), and generate's own log-probs equal the shared training forward's."""
    ckpt, processor, prompts = setup
    prompt = prompts[data_type]
    prompt.vision = {k: v.float() if k.startswith("pixel") else v for k, v in prompt.vision.items()}
    model = PolicyModule(load_model(ckpt), kernel_backend="torch").eval()
    cfg = Config().rollout
    cfg.max_completion_length, cfg.top_p = 9, 0.95
    eos_ids, pad_id = special_ids(processor.tokenizer)
    suppress = vision_token_ids(processor.tokenizer)
    prefills = []
    hook = model.hf.model.register_forward_hook(lambda m, a, kw, out: prefills.append(kw["input_ids"].shape),
                                                with_kwargs=True)
    samples = {}
    for shared in (False, True):
        prefills.clear()
        torch.manual_seed(5)
        samples[shared] = generate(model, prompt, prompt.vision, 6, cfg, eos_ids, pad_id, suppress_ids=suppress,
                                   shared_prefill=shared)
        P = prompt.input_ids.numel()
        assert prefills[0] == ((1, P - 1) if shared else (6, P))  # the vision tower and the prompt once, or per row
    hook.remove()
    assert torch.equal(samples[True][0], samples[False][0]) and torch.equal(samples[True][1], samples[False][1])

    # the positions generate decoded with are the training forward's: its scores give the same log-probs
    ids = prompt.input_ids[None]
    from videor1.generation import rollout_config

    gen_cfg = rollout_config(cfg, eos_ids, pad_id, suppress, 1)
    gen_cfg.output_logits, gen_cfg.return_dict_in_generate, gen_cfg.eos_token_id = True, True, []
    torch.manual_seed(6)
    with torch.no_grad():
        cache = model.prefill(ids[:, :-1], prompt.vision, 3)
        rows = ids.expand(3, -1)
        out = model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), cache=cache, generation_config=gen_cfg)
        completion = out.sequences[:, ids.shape[1]:]
        gen_logp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
        gen_logp = gen_logp.gather(-1, completion[..., None])[..., 0]
        train_logp = model(build_inputs(prompt, completion, torch.ones_like(completion), shared=True), ids.shape[1],
                           completion, mode="logprobs")
    torch.testing.assert_close(train_logp, gen_logp, rtol=0, atol=1e-4)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_process_engines_give_the_same_loss_logprobs_and_gradients(tiny_ckpt, synth_data, tmp_path, engine):
    """FSDP2 and DeepSpeed ZeRO-3 (activation checkpointing on), 2 ranks on gloo: reference and old
    log-probs, loss, KL and every full (gathered) parameter gradient equal the repeated forward's."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(repo, "tests", "shared_prefix_worker.py"), engine, tiny_ckpt, synth_data,
                           str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["kind"] for r in reports] == ["video", "image"]
    for r in reports:
        same, again = r["shared_vs_repeated"], r["shared_vs_shared"]
        assert again["grad_rel"] == 0 and again["loss"] == 0, again  # gradients were cleared between runs
        assert same["n_grads"] > 50 and same["grad_norm"] > 0
        assert same["ref"] <= 1e-5 and same["old"] <= 1e-5 and same["kl"] <= 1e-5, same
        assert same["loss"] <= 1e-5 * max(1.0, abs(r["loss"])), same
        assert same["grad_rel"] <= 1e-5, same


def test_benchmark_quick_run_writes_both_forms(tmp_path):
    """benchmarks/bench_shared_prefix.py --quick: every (provider, mode, metric) row, and the shared
    form holds less memory at its peak (a count of bytes, not a time)."""
    import csv
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_shared_prefix", os.path.join(repo, "benchmarks",
                                                                                     "bench_shared_prefix.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for mode in ("policy", "reference"):
        for provider in ("repeated", "shared"):
            assert {(provider, mode, "time_ms"), (provider, mode, "peak_mem_mb")} <= got
        peak = {r["provider"]: float(r["p50"]) for r in rows if r["mode"] == mode and r["metric"] == "peak_mem_mb"}
        assert 0 < peak["shared"] < peak["repeated"], peak
    assert all(r["device"] and "P=" in r["shape"] for r in rows)
