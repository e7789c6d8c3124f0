"""Under FSDP2 with bf16 mixed precision, the loss still receives fp32 advantages and reference
log-probs. FSDP2 casts every float input of a sharded module's forward to the param dtype; on the
root that rounded the fp32 log-probs the loss compares (ratio, KL) to bf16. Runs FSDP2 on one CPU
rank (gloo)."""

import os

import pytest
import torch
import torch.distributed as dist

from videor1 import policy as policy_module
from videor1.config import Config
from videor1.engine import FSDP2Engine
from videor1.policy import PolicyModule


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_bf16_loss_inputs_stay_fp32(tiny_ckpt, one_rank_group, monkeypatch):
    from transformers import AutoModelForImageTextToText

    seen = {}
    real = policy_module.kernels.linear_grpo_loss

    def spy(hidden, weight, ids, advantages, mask, **kwargs):
        seen.update(hidden=hidden.dtype, advantages=advantages.dtype, ref=kwargs["ref_logprobs"].dtype)
        return real(hidden, weight, ids, advantages, mask, **kwargs)

    monkeypatch.setattr(policy_module.kernels, "linear_grpo_loss", spy)
    cfg = Config()
    cfg.train.mixed_precision = "bf16"
    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt)
    engine = FSDP2Engine(cfg, PolicyModule(model, kernel_backend="torch"), 1, trainable=False)
    torch.manual_seed(0)
    ids = torch.randint(10, 100, (2, 9))
    completion = ids[:, 5:]
    ref = torch.full(completion.shape, -2.123456, dtype=torch.float32)
    loss, _ = engine({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 5, completion, mode="loss",
                     advantages=torch.tensor([0.5, -0.5]), completion_mask=torch.ones_like(completion),
                     loss_kwargs={"ref_logprobs": ref, "beta": 0.04})
    assert seen == {"hidden": torch.bfloat16, "advantages": torch.float32, "ref": torch.float32}
    assert torch.isfinite(loss)
