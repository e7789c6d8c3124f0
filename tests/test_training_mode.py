"""The trained model is in training mode (so activation checkpointing really recomputes), the
reference stays in eval mode, and rollouts sample in eval mode (so the KV cache stays on).

transformers' from_pretrained returns a model in eval mode, its checkpointed layers recompute only
in training mode, and generate turns the KV cache off for a checkpointed model in training mode.
Found by benchmarks/simulate_7b.py, whose 7B activation memory depends on all three. FSDP2 on one
CPU rank (gloo)."""

import pytest
import torch
import torch.distributed as dist

from videor1.config import Config
from videor1.engine import build_engine
from videor1.policy import PolicyModule
from videor1.train import sampling_mode


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _engine(tiny_ckpt, trainable: bool, checkpointing: bool):
    from transformers import AutoModelForImageTextToText

    cfg = Config()
    cfg.model.gradient_checkpointing = checkpointing
    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt)
    assert not model.training  # what from_pretrained returns
    module = PolicyModule(model, kernel_backend="torch")
    if not trainable:
        module.requires_grad_(False)
    return build_engine(cfg, module, 1, 1, trainable=trainable)


def _layer_calls(engine, backward: bool) -> int:
    """Calls of the first decoder layer's MLP during one loss forward (+ backward): transformers checkpoints
    the layer's forward (inside its hooks), so a recompute shows as a second call of its submodules."""
    layer = engine.module.hf.model.language_model.layers[0].mlp
    calls = []
    handle = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    ids = torch.randint(10, 100, (2, 9))
    completion = ids[:, 5:]
    loss, _ = engine({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 5, completion, mode="loss",
                     advantages=torch.tensor([0.5, -0.5]), completion_mask=torch.ones_like(completion),
                     loss_kwargs={"beta": 0.0})
    if backward:
        engine.backward(loss)
    handle.remove()
    return len(calls)


def test_checkpointing_recomputes_in_training_and_rollouts_sample_in_eval(tiny_ckpt, one_rank_group):
    policy = _engine(tiny_ckpt, trainable=True, checkpointing=True)
    assert policy.module.training and policy.module.hf.training
    assert _layer_calls(policy, backward=True) == 2  # forward, then the recompute in backward
    with policy.full_weights() as model, sampling_mode(model):
        assert not model.training and not model.hf.model.language_model.layers[0].training
    assert policy.module.training  # restored


def test_without_checkpointing_no_recompute_and_reference_in_eval(tiny_ckpt, one_rank_group):
    policy = _engine(tiny_ckpt, trainable=True, checkpointing=False)
    assert policy.module.training and _layer_calls(policy, backward=True) == 1
    reference = _engine(tiny_ckpt, trainable=False, checkpointing=True)
    assert not reference.module.training and not reference.module.hf.training


def test_frozen_reference_reshards_its_root_after_forward(tiny_ckpt, one_rank_group):
    """FSDP2 keeps a root's parameters gathered after forward (for the backward it expects); the frozen
    reference has no backward, so its engine reshards them (2.2 GB of embeddings + lm_head at 7B)."""
    from torch.distributed.tensor import DTensor

    reference = _engine(tiny_ckpt, trainable=False, checkpointing=False)
    ids = torch.randint(10, 100, (2, 9))
    with torch.no_grad():
        reference({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 5, ids[:, 5:], mode="logprobs")
    head = reference.module.hf.lm_head.weight
    assert isinstance(head, DTensor), "the root's parameters are sharded again after the forward"
