"""The shared-prefix forward on a GPU (CUDA only; `make gpu-check` runs this file): the tiny model on
cuda in fp32 and bf16, one packed group vs G repeated sequences, through PolicyModule and the fused
kernel: log-probs, loss, KL and every parameter gradient, and the rollout prefill's samples.

On the GPU both passes of the shared-prefix attention are torch's SDPA (its flash or memory-efficient
kernels: the lower-right causal mask of the completion blocks is a CausalBias, never materialised);
the repeated forward uses the model's own implementation. The CPU tests check the same in fp64."""

import os

import pytest
import torch

from videor1.config import Config
from videor1.forward import build_inputs
from videor1.model import load_model, load_processor
from videor1.policy import PolicyModule
from videor1.rollout import generate, prepare_prompt, vision_token_ids
from videor1.session import special_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}  # (log-prob / loss atol, gradient rel. norm)


@pytest.fixture(scope="module")
def prompts(tiny_ckpt, synth_data, synth_rows, synth_data_cfg):
    rows, data = synth_rows, synth_data_cfg
    processor = load_processor(tiny_ckpt)
    return processor, {t: prepare_prompt(next(r for r in rows if r["data_type"] == t), processor, data,
                                         os.path.dirname(synth_data), shuffled=False) for t in ("video", "image")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("data_type", ["video", "image"])
def test_shared_equals_repeated_on_cuda(tiny_ckpt, prompts, dtype, data_type):
    _, by_type = prompts
    prompt = by_type[data_type].to("cuda")
    prompt.vision = {k: v.to(dtype) if k.startswith("pixel") else v for k, v in prompt.vision.items()}
    model = load_model(tiny_ckpt).to("cuda", dtype).train()
    policy = PolicyModule(model, kernel_backend="auto")
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 4, 1, 7])
    mask = (torch.arange(9)[None] < lengths[:, None]).long().cuda()
    ids = torch.randint(10, 700, mask.shape, generator=g).cuda().masked_fill(mask == 0, 0)
    adv = torch.randn(4, generator=g).cuda()
    ref = (-3 + 0.5 * torch.randn(mask.shape, generator=g)).cuda()
    P = prompt.input_ids.numel()
    out = {}
    for shared in (False, True):
        inputs = build_inputs(prompt, ids, mask, shared=shared)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            logp = policy(inputs, P, ids, mode="logprobs", completion_mask=mask)
        loss, m = policy(inputs, P, ids, mode="loss", advantages=adv, completion_mask=mask,
                         loss_kwargs=dict(beta=0.04, ref_logprobs=ref))
        loss.backward()
        out[shared] = (logp, loss.detach().float(), m, {n: p.grad.float().clone() for n, p in model.named_parameters()})
    atol, gtol = TOL[dtype]
    a, b = out[False], out[True]
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=atol * 10 if dtype == torch.bfloat16 else atol)
    torch.testing.assert_close(b[1], a[1], rtol=atol, atol=atol)
    torch.testing.assert_close(b[2]["kl"].float(), a[2]["kl"].float(), rtol=atol, atol=atol)
    worst = max(float((a[3][n] - b[3][n]).norm() / a[3][n].norm()) for n in a[3])
    assert worst <= gtol, worst


def test_rollout_prefill_once_on_cuda(tiny_ckpt, prompts):
    processor, by_type = prompts
    prompt = by_type["video"].to("cuda")
    model = PolicyModule(load_model(tiny_ckpt).to("cuda"), kernel_backend="auto").eval()
    cfg = Config().rollout
    cfg.max_completion_length = 8
    eos_ids, pad_id = special_ids(processor.tokenizer)
    ids, mask = generate(model, prompt, prompt.vision, 6, cfg, eos_ids, pad_id,
                         suppress_ids=vision_token_ids(processor.tokenizer), shared_prefill=True)
    assert ids.device.type == "cuda" and ids.shape[0] == 6 and mask.sum() > 0
    # the samples are the policy's: their training log-probs are finite and below 0
    with torch.no_grad():
        logp = model(build_inputs(prompt, ids, mask, shared=True), prompt.input_ids.numel(), ids, mode="logprobs",
                     completion_mask=mask)
    counted = logp[mask.bool()]
    assert torch.isfinite(counted).all() and (counted <= 0).all()
