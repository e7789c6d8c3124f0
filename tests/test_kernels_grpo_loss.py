"""kernels.grpo_loss / selective_logprobs (logits path) against the fp64 reference, both backends.

Runs on the CPU: backend "triton" executes the Triton kernels under TRITON_INTERPRET=1 (set by the
Makefile / CI), backend "torch" the chunked pure-torch path. Shapes are small; the interpreter is slow.
"""

import importlib
import os

import pytest
import torch

import kernels
from kernels.reference import reference_grpo_loss, reference_logprobs

BACKENDS = ["torch", "triton"]
# per-dtype tolerances: (loss/metric rtol, gradient relative-norm error)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1.5e-2)}


@pytest.fixture(autouse=True, scope="module")
def _need_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run these tests with TRITON_INTERPRET=1 (no GPU here: the Triton kernels run in the interpreter)")


def make_batch(B=3, L=5, V=1000, dtype=torch.float32, seed=0, scale=3.0, temperature=1.0, mask="partial",
               old_sigma=0.3, ref_sigma=0.3):
    """Logits, ids, advantages, a mask, and old/ref log-probs near the policy's (so ratios clip sometimes)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    ids = torch.randint(0, V, (B, L), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    m = torch.ones(B, L, dtype=torch.bool)
    if mask == "partial":
        m[0, L - 2:] = False  # a padded tail
        if B > 2:
            m[2] = False  # an empty completion
    elif mask == "none":
        m[:] = False
    with torch.no_grad():
        logp = reference_logprobs(logits.double(), ids, temperature)
    old = (logp + old_sigma * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    ref = (logp + ref_sigma * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    return logits, ids, adv.float(), m, old, ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_both(logits, ids, adv, mask, backend, scale_grad=1.0, **kw):
    """(ours loss, metrics, dlogits), (reference in fp64 on the same values)."""
    x = logits.clone().requires_grad_(True)
    loss, metrics = kernels.grpo_loss(x, ids, adv, mask, backend=backend, **kw)
    (loss * scale_grad).backward()
    xr = logits.detach().double().requires_grad_(True)
    kw_ref = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_loss, ref_metrics = reference_grpo_loss(xr, ids, adv.double(), mask, **kw_ref)
    (ref_loss * scale_grad).backward()
    return (loss.detach(), metrics, x.grad), (ref_loss.detach(), ref_metrics, xr.grad)


def assert_close(ours, ref, dtype, mask=None, tol=None):
    (loss, metrics, grad), (rloss, rmetrics, rgrad) = ours, ref
    rtol, gtol = tol or TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == rgrad.shape
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()
    scale = max(1.0, abs(rloss.item()))
    assert abs(loss.item() - rloss.item()) <= rtol * scale, (loss.item(), rloss.item())
    for k in ("kl", "clip_ratio"):
        assert not metrics[k].requires_grad
        assert abs(float(metrics[k]) - float(rmetrics[k])) <= rtol * max(1.0, abs(float(rmetrics[k]))), k
    assert rel_err(grad, rgrad) <= gtol, rel_err(grad, rgrad)
    if mask is not None:  # masked tokens get exactly zero gradient
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types_and_levels_fp64(loss_type, importance_level, backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=torch.float64, temperature=0.7)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.7,
              loss_type=loss_type, importance_level=importance_level, max_completion_length=7, num_items=11)
    ours, ref_ = run_both(logits, ids, adv, mask, backend, **kw)
    assert_close(ours, ref_, torch.float64, mask)
    if importance_level == "token":
        assert float(ours[1]["clip_ratio"]) > 0  # the batch exercises the clipped branch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_old,has_ref,beta", [
    (False, False, 0.0), (False, True, 0.0), (False, True, 0.04), (True, False, 0.0), (True, True, 0.3)])
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_old_ref_beta_combinations(has_old, has_ref, beta, importance_level, backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=torch.float64, seed=1)
    kw = dict(old_logprobs=old if has_old else None, ref_logprobs=ref if has_ref else None, beta=beta,
              importance_level=importance_level)
    ours, ref_ = run_both(logits, ids, adv, mask, backend, **kw)
    assert_close(ours, ref_, torch.float64, mask)
    if not has_ref:
        assert float(ours[1]["kl"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_fp64(dtype, backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=dtype, seed=2, temperature=0.9)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, temperature=0.9)
    ours, ref_ = run_both(logits, ids, adv, mask, backend, **kw)
    assert_close(ours, ref_, dtype, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocabulary_at_a_few_tokens(dtype, backend):
    # V = 152064 is not a multiple of any power-of-two block
    logits, ids, adv, mask, old, ref = make_batch(B=2, L=2, V=152064, dtype=dtype, seed=3, mask="all")
    ids[0, 0] = 152063  # the last vocabulary entry, in the ragged tail block
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, importance_level="sequence")
    ours, ref_ = run_both(logits, ids, adv, mask, backend, **kw)
    assert_close(ours, ref_, dtype, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_batch_gives_zero_loss_and_gradient(backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=torch.float32, mask="none", seed=4)
    ids[0, 0] = -100  # ignored label ids at masked positions are allowed
    old[1, 1] = float("nan")  # garbage at masked positions never reaches the result
    x = logits.clone().requires_grad_(True)
    loss, metrics = kernels.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and float(metrics["kl"]) == 0.0 and float(metrics["clip_ratio"]) == 0.0
    assert (x.grad == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on the all -inf masked row
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite(dtype, backend):
    logits, ids, adv, mask, _, _ = make_batch(B=2, L=4, V=300, dtype=torch.float64, seed=5, mask="partial")
    logits[0, 0, :] = -1e4
    logits[0, 0, ids[0, 0]] = 1e4  # the chosen token dominates: logp ~ 0
    logits[0, 1, ids[0, 1]] = -1e4  # the chosen token is (almost) impossible: logp ~ -1e4
    logits[1, 0, ::3] = float("-inf")  # -inf entries (never the chosen token)
    logits[1, 0, ids[1, 0]] = 2.0
    logits[1, 1, :] = 1e4  # a flat row of huge values
    logits[0, 3, :] = float("-inf")  # garbage in a masked row
    logits = logits.to(dtype)
    with torch.no_grad():
        logp = reference_logprobs(logits.double(), ids)
    old = torch.where(mask, logp, 0.0).float() + 0.1
    ref = torch.where(mask, logp, 0.0).float() - 0.5  # ref - logp = -0.5 except the -1e4 token: clamped
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, temperature=0.8)
    ours, ref_ = run_both(logits, ids, adv, mask, backend, **kw)
    # fp32 rounds a logit of 1e4 by ~5e-4: softmax entries of such rows carry that relative error
    assert_close(ours, ref_, dtype, mask, tol=(2e-5, 2e-3) if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_clamp_engaged_and_off(backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=torch.float64, seed=6)
    ref = ref.clone()
    ref[0, 0] += 14.0  # ref - logp ~ 14: clamped to 10 (its KL gradient is then 0)
    for kl_clamp in (10.0, None, 2.5):
        kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.1, kl_clamp=kl_clamp)
        ours, ref_ = run_both(logits, ids, adv, mask, backend, **kw)
        assert_close(ours, ref_, torch.float64, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_logits_and_scaled_loss(backend):
    # logits[:, :-1] of a [B, L+1, V] tensor: rows are not uniformly strided, nothing is copied
    full, ids, adv, mask, old, ref = make_batch(B=2, L=6, V=257, dtype=torch.float64, seed=7)
    x = full.clone().requires_grad_(True)
    loss, _ = kernels.grpo_loss(x[:, :-1], ids[:, :-1], adv, mask[:, :-1], old_logprobs=old[:, :-1],
                                ref_logprobs=ref[:, :-1], backend=backend)
    (2.5 * loss).backward()
    xr = full.clone().requires_grad_(True)
    ref_loss, _ = reference_grpo_loss(xr[:, :-1], ids[:, :-1], adv.double(), mask[:, :-1],
                                      old_logprobs=old[:, :-1].double(), ref_logprobs=ref[:, :-1].double())
    (2.5 * ref_loss).backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    assert rel_err(x.grad, xr.grad) < 1e-10
    assert (x.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_gradient_option(backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=torch.float32, seed=8)
    kw = dict(old_logprobs=old, ref_logprobs=ref, importance_level="sequence")
    leaf = logits.clone().requires_grad_(True)
    want_loss, _ = kernels.grpo_loss(leaf, ids, adv, mask, backend=backend, **kw)
    want_loss.backward()
    # the logits of a model: a non-leaf tensor whose buffer receives the gradient
    w = torch.eye(logits.shape[-1]).requires_grad_(True)
    z = logits @ w
    loss, _ = kernels.grpo_loss(z, ids, adv, mask, backend=backend, inplace=True, **kw)
    (3.0 * loss).backward()
    assert abs(loss.item() - want_loss.item()) < 1e-6
    V = logits.shape[-1]
    assert rel_err(w.grad, logits.reshape(-1, V).t() @ (3.0 * leaf.grad).reshape(-1, V)) < 1e-5
    # autograd-safe: a leaf that requires grad cannot be consumed, and other saved uses are detected
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        kernels.grpo_loss(logits.clone().requires_grad_(True), ids, adv, mask, backend=backend, inplace=True, beta=0)
    z = logits @ w
    other = (z * z).sum()  # saves z for its backward
    loss, _ = kernels.grpo_loss(z, ids, adv, mask, backend=backend, inplace=True, beta=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_logprobs(dtype, backend):
    logits, ids, *_ = make_batch(B=2, L=3, V=1000, dtype=dtype, seed=9)
    logits.requires_grad_(True)
    logp = kernels.selective_logprobs(logits, ids, temperature=0.6, backend=backend)
    want = reference_logprobs(logits.detach().double(), ids, 0.6)
    assert logp.dtype == torch.float32 and logp.shape == ids.shape and not logp.requires_grad
    assert float((logp.double() - want).abs().max()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches(backend):
    logits, ids, adv, mask, old, ref = make_batch(dtype=torch.float32, seed=10)
    with torch.no_grad():
        loss, metrics = kernels.grpo_loss(logits.requires_grad_(True), ids, adv, mask, old_logprobs=old,
                                          ref_logprobs=ref, backend=backend)
    assert loss.grad_fn is None
    want, _ = reference_grpo_loss(logits.detach().double(), ids, adv.double(), mask, old_logprobs=old.double(),
                                  ref_logprobs=ref.double())
    assert abs(loss.item() - want.item()) < 1e-5


def test_torch_path_chunks_rows(monkeypatch):
    # force many small row chunks in the pure-torch path; result must not change
    gl = importlib.import_module("kernels.grpo_loss")  # (kernels.grpo_loss is also the function's name)

    logits, ids, adv, mask, old, ref = make_batch(B=3, L=5, V=1000, dtype=torch.float64, seed=11)
    kw = dict(old_logprobs=old, ref_logprobs=ref)
    whole = run_both(logits, ids, adv, mask, "torch", **kw)
    monkeypatch.setattr(gl, "_TORCH_CHUNK_BYTES", 2 * 1000 * 8)  # 2 rows per chunk
    chunked = run_both(logits, ids, adv, mask, "torch", **kw)
    assert abs(float(whole[0][0]) - float(chunked[0][0])) < 1e-12
    assert rel_err(chunked[0][2], whole[0][2]) < 1e-12
    assert_close(chunked[0], chunked[1], torch.float64, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_finite_differences(backend):
    # tiny fp64 shapes: our closed-form gradient against central finite differences
    logits, ids, adv, mask, old, ref = make_batch(B=2, L=3, V=7, dtype=torch.float64, seed=12, scale=1.0,
                                                   old_sigma=0.05, ref_sigma=0.5)
    for level in ("token", "sequence"):
        def f(x):
            return kernels.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.2,
                                     temperature=0.8, importance_level=level, backend=backend)[0]
        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
