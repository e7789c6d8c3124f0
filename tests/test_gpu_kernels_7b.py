"""The Triton GRPO kernels on a GPU at Qwen2.5-VL-7B's head, against the fp64 reference (CUDA only).

N = B * L = 8 x 1024 = 8192 completion tokens, V = 152064 and, for the lm_head-fused kernel,
H = 3584; bf16 and fp32; token- and sequence-level ratios; ragged completions (full, one token,
empty, ...) with garbage at every masked position: NaN / -inf / huge logits rows (and NaN in the
unread last slot of the documented view logits[:, :-1]), ids -100, NaN old and -inf reference
log-probs. Forward (loss, kl, clip_ratio, selective log-probs) and backward (every gradient) against
kernels.reference in float64, at the per-dtype tolerances of tests/test_kernels_*.py.

The fp64 reference at this size would hold 10 GB of logits per copy, so it runs on the GPU one
sequence (1024 rows) at a time and is split exactly where the math allows: log-probs per chunk ->
reference_grpo_from_logprobs on the [B, L] log-probs (loss, metrics, d loss / d logp) -> the chain
rule back through each chunk's reference_logprobs by autograd. Nothing here is a second formula.

Skipped without CUDA (the CPU tests check the same kernels at small shapes under TRITON_INTERPRET=1);
`make gpu-check` runs this file on a borrowed GPU.
"""

import gc
import os

import pytest
import torch

import kernels
from kernels.reference import reference_grpo_from_logprobs, reference_logprobs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the 7B-shape kernel checks run on one "
                                                             "(make gpu-check)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: the interpreter cannot run the 7B shapes"),
]

DEVICE = "cuda"
B, L, V, H = 8, 1024, 152064, 3584
LENGTHS = [1024, 1000, 513, 1, 0, 768, 1023, 257]  # ragged: full, nearly full, one token, empty, ...
KW = dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.9, loss_type="grpo", kl_clamp=10.0)
# (loss / metric rtol, gradient relative-norm error): the CPU tests' per-dtype tolerances
TOL_LOGITS = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1.5e-2)}  # tests/test_kernels_grpo_loss.py
TOL_LINEAR = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 3e-2)}  # tests/test_kernels_linear_grpo_loss.py
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
LEVELS = ["token", "sequence"]


@pytest.fixture(autouse=True)
def _clean_gpu():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs in fp32 (the default; made sure)
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    gc.collect()
    torch.cuda.empty_cache()


def ragged_mask():
    t = torch.arange(L, device=DEVICE)
    return t[None, :] < torch.tensor(LENGTHS, device=DEVICE)[:, None]


def ids_advantages(mask, g):
    ids = torch.randint(0, V, (B, L), generator=g, device=DEVICE)
    ids[0, 5] = 1  # row (0, 5) gets -inf logits at multiples of 7 (never its chosen token)
    ids[1, LENGTHS[1] - 1] = V - 1  # the last vocabulary entry (in the ragged tail block), last counted token
    ids = torch.where(mask, ids, torch.full_like(ids, -100))  # ignored label ids at masked positions
    adv = torch.randn(B, generator=g, device=DEVICE)
    return ids, adv


def old_ref_from(logp64, mask, g):
    """Old / reference log-probs near the policy's (ratios clip sometimes, the KL clamp engages once),
    garbage at masked positions: NaN old, -inf reference."""
    old = (logp64 + 0.3 * torch.randn(logp64.shape, generator=g, device=DEVICE, dtype=torch.float64)).float()
    ref = (logp64 + 0.3 * torch.randn(logp64.shape, generator=g, device=DEVICE, dtype=torch.float64)).float()
    ref[0, 0] = logp64[0, 0] + 14.0  # ref - logp ~ 14: clamped to 10
    old = torch.where(mask, old, torch.full_like(old, float("nan")))
    ref = torch.where(mask, ref, torch.full_like(ref, float("-inf")))
    return old, ref


def put_garbage_rows(view, mask):
    """NaN, -inf and huge rows at masked positions of [B, L, V] logits (in place)."""
    t = torch.arange(L, device=view.device)[None, :].expand(B, L)
    masked = ~mask
    view[masked & (t % 3 == 0)] = float("nan")
    view[masked & (t % 3 == 1)] = float("-inf")
    view[masked & (t % 3 == 2)] = 1e4


def rel_err_sq(a, b):
    """(|a - b|^2, |b|^2) in float64, to accumulate a relative norm error over chunks."""
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum()), float((b ** 2).sum())


def reference_logp_rows(logits_b, ids_b, mask_b):
    """Sequence b's fp64 log-probs as reference_grpo_loss computes them: masked rows replaced by zeros
    and masked ids by 0 before the softmax (so their garbage stays out)."""
    ids0 = torch.where(mask_b, ids_b, torch.zeros_like(ids_b))
    return reference_logprobs(torch.where(mask_b[:, None], logits_b, 0.0), ids0, KW["temperature"])


def reference_logp(rows, ids, mask):
    """[B, L] float64 log-probs, one sequence at a time; rows(b) -> [L, V] float64 logits."""
    with torch.no_grad():
        return torch.stack([reference_logp_rows(rows(b), ids[b], mask[b]) for b in range(B)])


def reference_loss(logp, adv, mask, old, ref, level):
    """(loss, metrics, d loss / d logp) of kernels.reference on the fp64 [B, L] log-probs."""
    lp = logp.clone().requires_grad_(True)
    loss, metrics = reference_grpo_from_logprobs(lp, adv.double(), mask, old.double(), ref.double(), beta=KW["beta"],
                                                 eps_low=KW["eps_low"], eps_high=KW["eps_high"],
                                                 loss_type=KW["loss_type"], importance_level=level,
                                                 kl_clamp=KW["kl_clamp"])
    (dlogp,) = torch.autograd.grad(loss, lp)
    return loss.detach(), metrics, dlogp


def reference_backprop(rows, b, ids, mask, dlogp):
    """The chain rule of sequence b: d loss / d logp back through its reference log-probs (autograd)
    into the leaves rows(b) was built from."""
    torch.autograd.backward(reference_logp_rows(rows(b), ids[b], mask[b]), grad_tensors=dlogp[b])


def assert_loss_and_metrics(loss, metrics, rloss, rmetrics, rtol):
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - rloss.item()) <= rtol * max(1.0, abs(rloss.item())), (loss.item(), rloss.item())
    for k in ("kl", "clip_ratio"):
        assert torch.isfinite(metrics[k]), k
        assert abs(float(metrics[k]) - float(rmetrics[k])) <= rtol * max(1.0, abs(float(rmetrics[k]))), \
            (k, float(metrics[k]), float(rmetrics[k]))


# ---- kernels.grpo_loss on logits [B, L+1, V] through the documented view logits[:, :-1] ------------------------

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_loss_7b_head_against_fp64(dtype, level):
    g = torch.Generator(device=DEVICE).manual_seed(0 if level == "token" else 1)
    mask = ragged_mask()
    ids, adv = ids_advantages(mask, g)
    full = (torch.randn(B, L + 1, V, generator=g, device=DEVICE) * 3.0).to(dtype)
    view = full[:, :-1]
    put_garbage_rows(view, mask)
    full[:, -1] = float("nan")  # the slot the view leaves out: never read
    full[0, 5, ::7] = float("-inf")  # a counted row with -inf entries
    rtol, gtol = TOL_LOGITS[dtype]
    leaves = [None] * B

    def rows(b):  # sequence b's logits in fp64, a fresh leaf for the reference's gradient
        leaves[b] = full[b, :L].detach().double().requires_grad_(True)
        return leaves[b]

    rlogp = reference_logp(rows, ids, mask)
    old, ref = old_ref_from(rlogp, mask, g)

    # forward: the selective log-probs (counted rows; masked rows hold garbage by design)
    ids_ok = torch.where(mask, ids, torch.zeros_like(ids))
    logp = kernels.selective_logprobs(view, ids_ok, temperature=KW["temperature"])
    assert logp.dtype == torch.float32
    assert float((logp.double() - rlogp)[mask].abs().max()) < 1e-4

    x = full.requires_grad_(True)
    loss, metrics = kernels.grpo_loss(x[:, :-1], ids, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                      importance_level=level, **KW)
    loss.backward()
    grad = x.grad
    x.requires_grad_(False)
    rloss, rmetrics, dlogp = reference_loss(rlogp, adv, mask, old, ref, level)
    assert_loss_and_metrics(loss, metrics, rloss, rmetrics, rtol)

    # backward: every row's gradient against the reference's chain rule, one sequence at a time
    assert grad.dtype == dtype and grad.shape == full.shape
    assert (grad[:, -1] == 0).all(), "the unread last slot got a gradient"
    assert (grad[:, :L][~mask] == 0).all(), "a masked row got a non-zero gradient"
    num = den = 0.0
    for b in range(B):
        assert torch.isfinite(grad[b].float()).all(), f"non-finite gradient in sequence {b}"
        reference_backprop(rows, b, ids, mask, dlogp)
        n, d = rel_err_sq(grad[b, :L], leaves[b].grad)
        num, den = num + n, den + d
        leaves[b] = None
    err = (num / max(den, 1e-300)) ** 0.5
    assert err <= gtol, f"gradient relative error {err:.3g} > {gtol}"


# ---- kernels.linear_grpo_loss: hidden [B, L, H] x lm_head [V, H] -----------------------------------------------

def linear_inputs(dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mask = ragged_mask()
    ids, adv = ids_advantages(mask, g)
    hidden = torch.randn(B, L, H, generator=g, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=DEVICE) * (2.0 / H ** 0.5)).to(dtype)  # logits ~ N(0, 4)
    return g, mask, ids, adv, hidden, weight


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_grpo_loss_7b_head_against_fp64(dtype, level):
    g, mask, ids, adv, hidden, weight = linear_inputs(dtype, seed=2 if level == "token" else 3)
    rtol, gtol = TOL_LINEAR[dtype]
    w64 = weight.double().requires_grad_(True)
    h64 = [None] * B

    def rows(b):  # sequence b's logits in fp64 from fp64 copies of its hidden states and the weight
        h64[b] = hidden[b].double().requires_grad_(True)
        return h64[b] @ w64.t()

    rlogp = reference_logp(rows, ids, mask)
    old, ref = old_ref_from(rlogp, mask, g)  # near the fp64 log-probs; garbage at masked positions

    ids_ok = torch.where(mask, ids, torch.zeros_like(ids))
    logp = kernels.linear_selective_logprobs(hidden, weight, ids_ok, temperature=KW["temperature"])
    assert float((logp.double() - rlogp)[mask].abs().max()) < (1e-4 if dtype == torch.float32 else 0.1)

    with torch.no_grad():  # forward only (no gradient work): the same loss
        loss_ng, _ = kernels.linear_grpo_loss(hidden, weight, ids, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                              importance_level=level, **KW)
    hx, wx = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = kernels.linear_grpo_loss(hx, wx, ids, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                             importance_level=level, **KW)
    loss.backward()
    assert abs(loss_ng.item() - loss.item()) <= 1e-6 * max(1.0, abs(loss.item()))

    rloss, rmetrics, dlogp = reference_loss(rlogp, adv, mask, old, ref, level)
    assert_loss_and_metrics(loss, metrics, rloss, rmetrics, rtol)

    assert hx.grad.dtype == dtype and wx.grad.dtype == dtype
    assert torch.isfinite(wx.grad.float()).all() and torch.isfinite(hx.grad.float()).all()
    assert (hx.grad[~mask] == 0).all(), "a masked row got a non-zero hidden gradient"
    num = den = 0.0
    for b in range(B):
        reference_backprop(rows, b, ids, mask, dlogp)  # d_hidden of sequence b; d_weight accumulates
        n, d = rel_err_sq(hx.grad[b], h64[b].grad)
        num, den = num + n, den + d
        h64[b] = None
    err_h = (num / max(den, 1e-300)) ** 0.5
    n, d = rel_err_sq(wx.grad, w64.grad)
    err_w = (n / max(d, 1e-300)) ** 0.5
    assert err_h <= gtol, f"d_hidden relative error {err_h:.3g} > {gtol}"
    assert err_w <= gtol, f"d_weight relative error {err_w:.3g} > {gtol}"


@pytest.mark.xfail(strict=False, reason="known: linear_grpo_loss runs masked rows through the d_weight GEMM "
                                        "(dlogits^T @ hidden), so NaN / inf hidden states at masked positions poison "
                                        "d_weight (0 * NaN); reproduced on the CPU at small shapes, both backends")
def test_linear_grpo_loss_garbage_hidden_in_masked_rows():
    g, mask, ids, adv, hidden, weight = linear_inputs(torch.bfloat16, seed=4)
    with torch.no_grad():
        lp = kernels.linear_selective_logprobs(hidden, weight, torch.where(mask, ids, torch.zeros_like(ids)))
    old, ref = old_ref_from(lp.double(), mask, g)
    clean, _ = kernels.linear_grpo_loss(hidden, weight, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, **KW)
    t = torch.arange(L, device=DEVICE)[None, :].expand(B, L)
    hidden[~mask & (t % 2 == 0)] = float("nan")
    hidden[~mask & (t % 2 == 1)] = float("-inf")
    hx, wx = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss, _ = kernels.linear_grpo_loss(hx, wx, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, **KW)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - clean.item()) <= 1e-6 * max(1.0, abs(clean.item()))
    assert (hx.grad[~mask] == 0).all() and torch.isfinite(hx.grad.float()).all()
    assert torch.isfinite(wx.grad.float()).all(), "garbage hidden rows at masked positions reached d_weight"
