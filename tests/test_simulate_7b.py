"""benchmarks/simulate_7b.py at reduced depth (2 decoder layers, 2 vision blocks, 7B widths): one
T-GRPO step of Qwen2.5-VL on a fake world of 8 under FakeTensorMode, ours and Video-R1's way.

Checks what the README's table relies on: every phase's categories add up to its total; the
parameter count is the architecture's (a meta-device build of the same config); FSDP2's sharding
(1/8 of the fp32 weights per rank, AdamW's two moments); Video-R1's full-sequence logits cost more
than our fused loss; the policy phase's FLOPs are forward + backward + the checkpoint recompute."""

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
    for style in ("ours", "video_r1"):
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
    res = results["ours"]
    assert res["params"] == n
    cats = res["peaks"]["optimizer"]
    # fp32 shards of 1/8 (FSDP2 pads dim 0 to a multiple of the world size: within 1%)
    assert abs(cats["Sharded Param"] - 4 * n / 8) <= 0.01 * 4 * n / 8
    assert cats["OptState"] >= 2 * cats["Sharded Param"]  # exp_avg and exp_avg_sq (+ the step's temporaries)
    assert res["reference_shard_bytes"] == pytest.approx(2 * n / 8, rel=0.01)  # the frozen bf16 reference


def test_video_r1_costs_more_and_flops_are_consistent(results):
    ours, vr1 = results["ours"], results["video_r1"]
    assert vr1["per_device_batch"] == 1 and ours["per_device_batch"] == 2
    assert vr1["peaks"]["policy"]["Total"] > ours["peaks"]["policy"]["Total"]
    f = ours["flops"]
    # per prompt: policy = forward + recompute + backward (~2x forward) ~ 4x the reference forward
    assert 3.0 <= f["policy"] / f["reference"] <= 4.5
    tw = ours["flops_by_tower"]["policy"]
    assert tw["vision tower"] > 0 and tw["language model + head"] > tw["vision tower"]
    assert ours["decode_step_flops"] > 0


def test_peaks_do_not_grow_with_the_per_device_batch(results, tmp_path):
    """Prompt groups run one after another: batch 3 peaks as batch 2 does (what the README's fit uses).
    (Batch 1 peaks lower: its only backward runs while the gradients are still being created; from the
    second group on they are all live, and nothing else grows with the batch.)"""
    out = tmp_path / "b3.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--layers", "2", "--vision-depth", "2", "--style", "ours",
                           "--batch", "3", "--no-flops", "--json", str(out)], capture_output=True, text=True,
                          timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    three, two = json.loads(out.read_text())["ours"]["peaks"], results["ours"]["peaks"]
    for phase in ("rollout", "reference", "policy", "optimizer"):
        assert abs(three[phase]["Total"] - two[phase]["Total"]) <= 0.01 * two[phase]["Total"], phase


def test_zero3_simulation_categories_and_partitions(tmp_path):
    """benchmarks/simulate_7b_zero3.py at reduced depth: DeepSpeed's own ZeRO-3 under fake tensors; the
    categories add up, every partition is 1/8, and the step ends where it started (nothing leaks)."""
    out = tmp_path / "z3.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "simulate_7b_zero3.py"), "--layers", "2",
                           "--vision-depth", "2", "--json", str(out)], capture_output=True, text=True, timeout=1200,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert list(res["peaks"]) == ["rollout", "reference", "policy", "optimizer"]
    for phase, cats in res["peaks"].items():
        assert sum(v for k, v in cats.items() if k != "Total") == cats["Total"] > 0, phase
    n = res["params"]
    cats = res["peaks"]["optimizer"]
    assert abs(cats["Sharded Param"] - 2 * n / 8) <= 0.01 * 2 * n / 8  # bf16 partitions
    assert res["after_step"]["Total"] == res["after_build"]["Total"] or \
        abs(res["after_step"]["Total"] - res["after_build"]["Total"]) <= 0.01 * res["after_build"]["Total"]
