"""The code around the model keeps every tensor on the right device, with the model on a second device.

Every other test runs with one device (the CPU), so nothing there notices a CPU tensor meeting a
GPU model. Here the model lives on torch's lazy tensor device, which has real values and raises
("Input tensor is not a lazy tensor: ...") whenever a lazy tensor meets a CPU tensor, as CUDA does.
The HF model is replaced by tests/standin.py's StandInVL (transformers' vision tower trips on the lazy
device); the prompts, the processor, the rewards, the fused-loss kernels, the train step's phases,
SFT's micro-step and evaluation are the real ones.

Before the fix (commit 743f2b8), the same flow raised at the first rollout or training forward:
- deepspeed-like engine (full_weights() yields the bare module; nothing moves the inputs): generate
  met CPU input_ids with the model's weights: `RuntimeError: Input tensor is not a lazy tensor:
  torch.LongTensor` (CUDA: "Expected all tensors to be on the same device");
- fsdp2-like engine (the root pre-forward moves generate's inputs to the device, so completions come
  back on the device): `rollout.training_inputs` (now videor1.forward) concatenated the CPU prompt ids with the device
  completion ids: `RuntimeError: ... GetTensorList only supports lists of [lazy tensors]` (CUDA:
  "Expected all tensors to be on the same device"); with the length bonus on, `tgrpo.group_rewards`
  mixed CPU accuracies with device lengths first: `Input tensor is not a lazy tensor: CPUBoolType`;
- SFT: the CPU batch met the device weights in the first forward (same error as deepspeed-like).
"""

import json
import os

import pytest
import torch

from standin import StandInEngine, StandInVL, lazy_device
from videor1.config import Config
from videor1.metrics import StepTimer
from videor1.policy import PolicyModule
from videor1.rollout import prepare_prompt, vision_token_ids
from videor1.session import special_ids


@pytest.fixture(scope="module")
def lazy():
    return lazy_device()


@pytest.fixture(scope="module")
def setup(tiny_ckpt, synth_data):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    with open(synth_data) as f:
        rows = json.load(f)
    cfg = Config()
    d = cfg.data
    d.fps, d.video_min_pixels, d.video_max_pixels, d.image_min_pixels, d.image_max_pixels = 8.0, 3136, 3136, 3136, 3136
    cfg.rollout.num_generations, cfg.rollout.max_completion_length = 4, 5
    cfg.train.shared_prefix = False  # the stand-in has no attention and no KV cache to share a prefix through
    cfg.rollout.batch_requests = False
    import reward_plugins  # noqa: F401 - registers test_signal, a dense reward (non-zero advantages)

    cfg.algo.rewards = ["accuracy", "format", "test_signal"]
    cfg.algo.kernel_backend = "torch"
    # The length bonus on, over every length: its rule reads the accuracies and the lengths together.
    cfg.algo.length_bonus, cfg.algo.length_min, cfg.algo.length_max = 0.2, 0, 100
    root = os.path.dirname(synth_data)
    gen = torch.Generator().manual_seed(0)
    video = next(r for r in rows if r["data_type"] == "video")
    image = next(r for r in rows if r["data_type"] == "image")
    prompts = [prepare_prompt(r, processor, d, root, shuffled=True, generator=gen) for r in (video, image)]
    return cfg, processor, rows, root, prompts


def _engines(processor, device, kind):
    tok = processor.tokenizer
    policy = StandInEngine(PolicyModule(StandInVL(tok, seed=0), kernel_backend="torch"), device, kind)
    reference = StandInEngine(PolicyModule(StandInVL(tok, seed=0), kernel_backend="torch").requires_grad_(False),
                              device, kind, trainable=False)
    return policy, reference


@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_tgrpo_step_with_the_model_on_another_device(setup, lazy, kind, num_iterations):
    from videor1.train import SafeRewards, StepContext, step_record, tgrpo_step

    cfg, processor, _, _, prompts = setup
    cfg.algo.num_iterations = num_iterations
    tok = processor.tokenizer
    policy, reference = _engines(processor, lazy, kind)
    eos_ids, pad_id = special_ids(tok)
    ctx = StepContext(cfg, policy, reference, tok, SafeRewards(cfg.algo.rewards), eos_ids, pad_id,
                      vision_token_ids(tok))
    before = policy.module.hf.lm_head.weight.detach().cpu().clone()
    timer = StepTimer()
    groups, stats = tgrpo_step(ctx, prompts, timer)

    assert [g.prompt.row["data_type"] for g in groups] == ["video", "image"]
    for g in groups:
        # Model-side tensors stayed on the model's device ...
        for t in (g.prompt.input_ids, g.completion_ids, g.mask, g.ref_logprobs, *g.prompt.vision.values()):
            assert t.device.type == "lazy"
        assert (g.old_logprobs is not None) == (num_iterations > 1)
        # ... the reward side is CPU work on CPU copies.
        for t in (g.lengths, g.total, g.advantages, *g.rewards.values()):
            assert t.device.type == "cpu"
        assert g.completion_ids.shape == (4, 5) and torch.equal(g.lengths, g.mask.cpu().sum(1))
        assert torch.isfinite(g.ref_logprobs.cpu()).all() and (g.ref_logprobs.cpu() <= 0).all()
    assert groups[0].shuffled_accuracy is not None and groups[0].shuffled_accuracy.shape == (2,)
    assert groups[1].shuffled_accuracy is None  # images get no shuffled rollouts
    # Every rollout was sampled with our settings, not a checkpoint's.
    configs = policy.module.hf.generation_configs
    assert len(configs) == 3 and all(c.do_sample and c.repetition_penalty == 1.0 for c in configs)
    assert [c.num_return_sequences for c in configs] == [4, 4, 2]  # every ordered request, then the shuffled

    assert len(stats.results) == num_iterations and all(r.applied for r in stats.results)
    assert stats.tokens == num_iterations * float(sum(g.lengths.sum() for g in groups))
    after = policy.module.hf.lm_head.weight.detach().cpu()
    assert not torch.equal(before, after)  # the optimiser stepped on the device weights

    record = step_record(1, groups, stats, timer, 1.0, reward_errors=0, attempted=2, skipped=0)
    for key in ("loss", "reward", "reward/accuracy", "reward/format", "reward/test_signal", "reward/length_bonus", "acc/ordered", "kl",
                "clip_ratio", "completion_length", "acc/shuffled", "temporal_bonus_rate", "grad_norm"):
        assert isinstance(record[key], float) and record[key] == record[key], key  # a number, not NaN
    assert record["completion_length"] == pytest.approx(float(torch.cat([g.lengths for g in groups]).float().mean()))


def test_sft_micro_step_with_the_model_on_another_device(setup, lazy, monkeypatch):
    from videor1 import policy as policy_module
    from videor1.sft import sft_example, sft_micro_step

    # torch.utils.checkpoint looks up a device module (torch.cuda, torch.cpu) that the lazy device does
    # not have; the chunked loss is computed without the recompute here, the same values otherwise.
    monkeypatch.setattr(policy_module, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    cfg, processor, _, _, prompts = setup
    tok = processor.tokenizer
    model, _ = _engines(processor, lazy, "deepspeed")
    _, pad_id = special_ids(tok)
    loss, tokens = sft_micro_step(model, prompts[:1], tok, "assistant", pad_id, 1, StepTimer())
    assert loss > 0 and tokens == sft_example(prompts[0], tok, "assistant")["input_ids"].numel()
    grads = [p.grad for p in model.module.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "lazy" for g in grads)
    assert float(sum(g.float().abs().sum() for g in grads).cpu()) > 0


def test_evaluate_with_the_model_on_another_device(setup, lazy):
    from videor1.eval import evaluate

    cfg, processor, rows, root, _ = setup
    model = StandInVL(processor.tokenizer, seed=0).to(lazy)
    results = evaluate(model, processor, rows[:4], cfg.data, root, max_new_tokens=3, progress=False, batch_size=2)
    assert len(results) == 4 and all("error" not in r for r in results)
    assert all(isinstance(r["output"], str) and 0.0 <= r["score"] <= 1.0 for r in results)
    (gen_cfg, *_) = model.generation_configs
    assert not gen_cfg.do_sample and gen_cfg.max_new_tokens == 3 and gen_cfg.repetition_penalty == 1.0
