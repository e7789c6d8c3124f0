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


# ---- the second pass at the 7B head: full form, in place, no host syncs, one compiled kernel, device guard ----

def full_form_inputs(seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mask = ragged_mask()
    ids, adv = ids_advantages(mask, g)
    full = torch.randn(B, L + 1, V, generator=g, device=DEVICE, dtype=torch.bfloat16) * 3
    put_garbage_rows(full[:, :L], mask)
    full[:, L] = float("nan")  # the unused last position
    with torch.no_grad():
        logp = kernels.selective_logprobs(full, torch.where(mask, ids, 0), KW["temperature"], mask)
    old, ref = old_ref_from(logp.double(), mask, g)
    return full, ids, adv, mask, old, ref


def test_full_form_no_host_sync_and_equal_to_sliced_7b():
    full, ids, adv, mask, old, ref = full_form_inputs(7)
    x = full.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        loss, metrics = kernels.grpo_loss(x, ids, adv, mask, old, ref, **KW)
        loss.backward()
        lp = kernels.selective_logprobs(full, ids, KW["temperature"], mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad.shape == full.shape and torch.isfinite(x.grad.float()).all()
    assert (x.grad[:, :L][~mask] == 0).all() and (x.grad[:, L] == 0).all()
    assert (lp[~mask] == 0).all() and torch.isfinite(lp).all()
    y = full.clone().requires_grad_(True)
    loss2, metrics2 = kernels.grpo_loss(y[:, :-1], ids, adv, mask, old, ref, **KW)
    loss2.backward()
    assert loss.item() == loss2.item() and float(metrics["kl"]) == float(metrics2["kl"])
    assert torch.equal(x.grad, y.grad)


def test_inplace_full_form_7b_equals_out_of_place():
    full, ids, adv, mask, old, ref = full_form_inputs(8)
    w = torch.ones((), device=DEVICE, requires_grad=True)
    z = full * w  # model-made logits (not a leaf)
    loss, _ = kernels.grpo_loss(z, ids, adv, mask, old, ref, inplace=True, **KW)
    (2.0 * loss).backward()
    x = full.clone().requires_grad_(True)
    want, _ = kernels.grpo_loss(x, ids, adv, mask, old, ref, **KW)
    (2.0 * want).backward()
    assert loss.item() == want.item()
    assert torch.equal(z, x.grad)  # the buffer holds the scaled gradient, bit for bit


def test_one_compiled_kernel_for_distinct_hyperparameters():
    from kernels import triton_rows

    full, ids, adv, mask, old, ref = full_form_inputs(9)
    x = full[:2, :L, :].contiguous()

    def cache_size():
        return sum(len(c[0]) for c in triton_rows._grpo_rows_kernel.device_caches.values())

    kw = dict(KW)
    kernels.grpo_loss(x, ids[:2], adv[:2], mask[:2], old[:2], ref[:2], **kw)
    n0 = cache_size()
    for beta, t in ((0.0, 0.7), (0.01, 1.1), (0.1, 0.9), (0.3, 1.3), (1.0, 0.6)):
        kw.update(beta=beta, temperature=t, eps_high=0.2 + beta / 10)
        kernels.grpo_loss(x, ids[:2], adv[:2], mask[:2], old[:2], ref[:2], **kw)
    assert cache_size() == n0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on cuda:1 while cuda:0 is current)")
def test_launch_on_the_tensors_device():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(2, 9, 1000, device=dev, generator=g, requires_grad=True)
    ids = torch.randint(0, 1000, (2, 8), device=dev, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool, device=dev)
    adv = torch.randn(2, device=dev, generator=g)
    loss, _ = kernels.grpo_loss(logits, ids, adv, mask, beta=0.0)  # Triton would launch on cuda:0 without the guard
    loss.backward()
    from kernels.reference import reference_grpo_loss

    ref = logits.detach().double().requires_grad_(True)
    want, _ = reference_grpo_loss(ref[:, :-1], ids, adv.double(), mask, beta=0.0)
    want.backward()
    assert logits.grad.device == dev and abs(loss.item() - want.item()) < 1e-5
    assert float((logits.grad.double() - ref.grad).norm() / ref.grad.norm()) < 2e-5
