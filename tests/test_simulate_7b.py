"""benchmarks/simulate_7b.py at reduced depth (2 decoder layers, 2 vision blocks, 7B widths): one
T-GRPO step of Qwen2.5-VL on a fake world of 8 under FakeTensorMode, ours (shared prefix), ours with
the repeated forward (train.shared_prefix: false) and Video-R1's way.

Checks what the README's table relies on: every phase's categories add up to its total; the
parameter count is the architecture's (a meta-device build of the same config); FSDP2's sharding
(1/8 of the fp32 weights per rank, AdamW's two moments); Video-R1's full-sequence logits cost more
than our fused loss; the policy phase's FLOPs are forward + backward + the checkpoint recompute; the
shared prefix holds less than the repeated forward in every phase that runs the model, its vision tower
does 1/G of the work, and its language model's FLOPs are the packed sequence's (counted from the
architecture's dimensions), not G prompts'."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "simulate_7b.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "res.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--layers", "2", "--vision-depth", "2", "--style", "both",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| **Total** |" in proc.stdout
    return json.loads(out.read_text())


def test_categories_add_up_and_phases(results):
    assert results["ours"]["shared_prefix"] and not results["ours_repeated"]["shared_prefix"]
    for style in ("ours", "ours_repeated", "video_r1"):
        peaks = results[style]["peaks"]
        assert list(peaks) == ["rollout", "reference", "policy", "optimizer"]
        for phase, cats in peaks.items():
            parts = sum(v for k, v in cats.items() if k != "Total")
            assert parts == cats["Total"] > 0, (style, phase, cats)


def test_parameters_and_sharding(results, tmp_path):
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import simulate_7b

    simulate_7b.write_config(str(tmp_path), 2, 2)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(str(tmp_path)))
    n = sum(p.numel() for p in model.parameters())
    for style in ("ours", "ours_repeated"):
        res = results[style]
        assert res["params"] == n
        cats = res["peaks"]["optimizer"]
        # fp32 shards of 1/8 (FSDP2 pads dim 0 to a multiple of the world size: within 1%)
        assert abs(cats["Sharded Param"] - 4 * n / 8) <= 0.01 * 4 * n / 8
        assert cats["OptState"] >= 2 * cats["Sharded Param"]  # exp_avg and exp_avg_sq (+ the step's temporaries)
        assert res["reference_shard_bytes"] == pytest.approx(2 * n / 8, rel=0.01)  # the frozen bf16 reference


def test_video_r1_costs_more_and_flops_are_consistent(results):
    vr1 = results["video_r1"]
    assert vr1["per_device_batch"] == 1
    for style in ("ours", "ours_repeated"):
        ours = results[style]
        assert ours["per_device_batch"] == 2
        assert vr1["peaks"]["policy"]["Total"] > ours["peaks"]["policy"]["Total"]
        f = ours["flops"]
        # per prompt: policy = forward + recompute + backward (~2x forward) ~ 4x the reference forward
        assert 3.0 <= f["policy"] / f["reference"] <= 4.5, style
        tw = ours["flops_by_tower"]["policy"]
        assert tw["vision tower"] > 0 and tw["language model + head"] > tw["vision tower"]
        assert ours["decode_step_flops"] > 0
    # the decode step is the same in both forms: G rows of one token over a cache of P + C slots
    assert results["ours"]["decode_step_flops"] == results["ours_repeated"]["decode_step_flops"]


def language_model_forward_flops(res: dict, text: dict) -> float:
    """The reference phase's language model + head FLOPs of one prompt group, from the dimensions: every
    linear layer's 2 * in * out per token over the tokens the form feeds (P + G*C packed, G * (P + C)
    repeated); attention's 4 * heads * head_dim per query x key pair over the rectangles the flash calls
    see (the FLOP counter counts a causal call's full rectangle: the packed form's prompt pass P x P and
    its G block passes C x (P + C), the repeated form's G passes (P + C) x (P + C)); the lm_head over the
    G*C completion positions only (the fused log-probs, both forms)."""
    P, C, G = res["prompt_len"], res["completion_len"], res["G"]
    h, kv, inter = text["hidden_size"], text["num_key_value_heads"], text["intermediate_size"]
    heads, d = text["num_attention_heads"], text["hidden_size"] // text["num_attention_heads"]
    per_token = 2 * (2 * h * h + 2 * h * kv * d + 3 * h * inter)  # q, o; k, v; gate, up, down
    if res["shared_prefix"]:
        tokens, pairs = P + G * C, P * P + G * C * (P + C)
    else:
        tokens, pairs = G * (P + C), G * (P + C) ** 2
    layers = res["layers"] * (per_token * tokens + 4 * heads * d * pairs)
    return layers + 2 * G * C * h * text["vocab_size"]


def test_shared_prefix_holds_less_and_counts_the_prompt_once(results):
    """The shared prefix against the repeated forward (same shapes, same engine): lower peaks wherever
    the model runs (one video and one prompt per group instead of G), the same optimizer step; the vision
    tower's FLOPs are 1/G of the repeated ones in every phase (the tower's work is per video, and its
    frames and windows are the same in each of the G copies, so exactly linear); the language model's are
    the packed sequence's; reference + policy drop by the forward's ratio."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import simulate_7b

    sh, rep = results["ours"], results["ours_repeated"]
    G = sh["G"]
    assert (sh["prompt_len"], sh["completion_len"], sh["G"]) == (rep["prompt_len"], rep["completion_len"], rep["G"])
    ps, pr = sh["peaks"], rep["peaks"]
    # policy: the checkpointed layer inputs and the recompute's / backward's temporaries are per token
    assert ps["policy"]["Activation"] < pr["policy"]["Activation"]
    assert ps["policy"]["Temp"] < pr["policy"]["Temp"]
    assert ps["policy"]["Total"] < pr["policy"]["Total"]
    for phase in ("rollout", "reference"):
        assert ps[phase]["Total"] < pr[phase]["Total"], phase
    assert ps["optimizer"]["Total"] == pr["optimizer"]["Total"]  # nothing of the forward's form is left

    for phase in ("rollout", "reference", "policy"):
        v_sh, v_rep = sh["flops_by_tower"][phase]["vision tower"], rep["flops_by_tower"][phase]["vision tower"]
        assert v_sh > 0 and v_sh / v_rep == pytest.approx(1 / G, rel=1e-3), phase

    text = simulate_7b.QWEN25VL_7B["text_config"]
    for res in (sh, rep):  # per group: the phase runs per_device_batch groups
        lm = res["flops_by_tower"]["reference"]["language model + head"] / res["per_device_batch"]
        assert lm == pytest.approx(language_model_forward_flops(res, text), rel=1e-3), res["shared_prefix"]

    def train(r):
        return r["flops"]["reference"] + r["flops"]["policy"]

    forward_ratio = sh["flops"]["reference"] / rep["flops"]["reference"]
    assert forward_ratio < 0.65  # at 2 layers the head's G*C positions (the same in both) weigh in
    # the policy phase is the same forward's matmuls again (recompute 1x, backward 2x) and the fused loss's
    # head (forward + backward over the completion positions, both forms): its ratio follows the forward's
    assert train(sh) / train(rep) == pytest.approx(forward_ratio, rel=0.1)


def test_peaks_do_not_grow_with_the_per_device_batch(results, tmp_path):
    """Prompt groups run one after another: batch 3 peaks as batch 2 does (what the README's fit uses).
    (Batch 1 peaks lower: its only backward runs while the gradients are still being created; from the
    second group on they are all live, and nothing else grows with the batch.)"""
    out = tmp_path / "b3.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--layers", "2", "--vision-depth", "2", "--style", "ours",
                           "--shared-prefix", "on", "--batch", "3", "--no-flops", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    three, two = json.loads(out.read_text())["ours"]["peaks"], results["ours"]["peaks"]
    for phase in ("rollout", "reference", "policy", "optimizer"):
        assert abs(three[phase]["Total"] - two[phase]["Total"]) <= 0.01 * two[phase]["Total"], phase


def test_zero3_simulation_categories_and_partitions(tmp_path):
    """benchmarks/simulate_7b_zero3.py at reduced depth, both forms: DeepSpeed's own ZeRO-3 under fake
    tensors; the categories add up, every partition is 1/8, the step ends where it started (nothing
    leaks), and the shared prefix holds less than the repeated forward where the model runs."""
    out = tmp_path / "z3.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "simulate_7b_zero3.py"), "--layers", "2",
                           "--vision-depth", "2", "--shared-prefix", "both", "--json", str(out)], capture_output=True,
                          text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    both = json.loads(out.read_text())
    assert both["ours"]["shared_prefix"] and not both["ours_repeated"]["shared_prefix"]
    for res in both.values():
        assert list(res["peaks"]) == ["rollout", "reference", "policy", "optimizer"]
        for phase, cats in res["peaks"].items():
            assert sum(v for k, v in cats.items() if k != "Total") == cats["Total"] > 0, phase
        n = res["params"]
        cats = res["peaks"]["optimizer"]
        assert abs(cats["Sharded Param"] - 2 * n / 8) <= 0.01 * 2 * n / 8  # bf16 partitions
        assert res["after_step"]["Total"] == res["after_build"]["Total"] or \
            abs(res["after_step"]["Total"] - res["after_build"]["Total"]) <= 0.01 * res["after_build"]["Total"]
    sh, rep = both["ours"]["peaks"], both["ours_repeated"]["peaks"]
    for phase in ("rollout", "reference", "policy"):
        assert sh[phase]["Activation"] < rep[phase]["Activation"], phase
        assert sh[phase]["Total"] < rep[phase]["Total"], phase
    assert sh["optimizer"]["Total"] == rep["optimizer"]["Total"]
