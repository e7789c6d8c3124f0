"""kernels.linear_grpo_loss / linear_selective_logprobs (lm_head fused) against the fp64 reference and Liger.

CPU only: backend "triton" runs the Triton epilogue under TRITON_INTERPRET=1, "torch" the pure-torch
path the CPU trainer uses. chunk_size is forced small so every test crosses several chunks.
"""

import os

import pytest
import torch

import kernels
from kernels.linear_grpo_loss import CHUNK_BUDGET_BYTES, chunk_rows
from kernels.reference import reference_linear_grpo_loss, reference_logprobs

BACKENDS = ["torch", "triton"]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 3e-2)}


@pytest.fixture(autouse=True, scope="module")
def _need_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run these tests with TRITON_INTERPRET=1 (no GPU here: the Triton kernels run in the interpreter)")


def make_batch(B=3, L=5, H=16, V=1000, dtype=torch.float32, seed=0, bias=True, temperature=1.0, mask="partial",
               old_sigma=0.3, ref_sigma=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.2).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, L), generator=g)
    adv = torch.randn(B, generator=g)
    m = torch.ones(B, L, dtype=torch.long)
    if mask == "partial":
        m[0, L - 2:] = 0
        if B > 2:
            m[2] = 0
    with torch.no_grad():
        logits = hidden.double() @ weight.double().t() + (0 if b is None else b.double())
        logp = reference_logprobs(logits, ids, temperature)
    old = (logp + old_sigma * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    ref = (logp + ref_sigma * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    return hidden, weight, b, ids, adv, m, old, ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_both(hidden, weight, bias, ids, adv, mask, backend, chunk_size=4, **kw):
    ours = [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss, metrics = kernels.linear_grpo_loss(ours[0], ours[1], ids, adv, mask, bias=ours[2], backend=backend,
                                             chunk_size=chunk_size, **kw)
    loss.backward()
    refs = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    kw_ref = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_loss, ref_metrics = reference_linear_grpo_loss(refs[0], refs[1], ids, adv.double(), mask, bias=refs[2],
                                                       **kw_ref)
    ref_loss.backward()
    return (loss.detach(), metrics, [t.grad if t is not None else None for t in ours]), \
        (ref_loss.detach(), ref_metrics, [t.grad if t is not None else None for t in refs])


def assert_close(ours, ref, dtype, mask=None):
    (loss, metrics, grads), (rloss, rmetrics, rgrads) = ours, ref
    rtol, gtol = TOL[dtype]
    assert torch.isfinite(loss)
    assert abs(loss.item() - rloss.item()) <= rtol * max(1.0, abs(rloss.item())), (loss.item(), rloss.item())
    for k in ("kl", "clip_ratio"):
        assert abs(float(metrics[k]) - float(rmetrics[k])) <= rtol * max(1.0, abs(float(rmetrics[k]))), k
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        if rg is None:
            continue
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert torch.isfinite(g.float()).all(), name
        assert rel_err(g, rg) <= gtol, (name, rel_err(g, rg))
    if mask is not None:
        assert (grads[0][mask == 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types_and_levels_fp64(loss_type, importance_level, backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(dtype=torch.float64, temperature=0.7)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.7,
              loss_type=loss_type, importance_level=importance_level, max_completion_length=6, num_items=9)
    ours, ref_ = run_both(hidden, weight, bias, ids, adv, mask, backend, **kw)  # 15 rows in chunks of 4
    assert_close(ours, ref_, torch.float64, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_old,has_ref,beta", [(False, False, 0.0), (False, True, 0.04), (True, True, 0.0)])
def test_old_ref_beta_combinations(has_old, has_ref, beta, backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(dtype=torch.float64, seed=1, bias=False)
    for level in ("token", "sequence"):
        kw = dict(old_logprobs=old if has_old else None, ref_logprobs=ref if has_ref else None, beta=beta,
                  importance_level=level)
        ours, ref_ = run_both(hidden, weight, None, ids, adv, mask, backend, **kw)
        assert_close(ours, ref_, torch.float64, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_fp64(dtype, backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(dtype=dtype, seed=2, temperature=0.9)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, temperature=0.9, importance_level="sequence")
    ours, ref_ = run_both(hidden, weight, bias, ids, adv, mask, backend, **kw)
    assert_close(ours, ref_, dtype, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocabulary_at_a_few_tokens(dtype, backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(B=2, L=2, H=8, V=152064, dtype=dtype, seed=3,
                                                               bias=False, mask="all")
    ids[1, 1] = 152063
    ours, ref_ = run_both(hidden, weight, None, ids, adv, mask, backend, chunk_size=3, old_logprobs=old,
                          ref_logprobs=ref)
    assert_close(ours, ref_, dtype, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_batch(backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(dtype=torch.float32, seed=4)
    mask[:] = 0
    ids[0, 1] = -100
    ours, _ = run_both(hidden, weight, bias, ids, adv, mask, backend, old_logprobs=old, ref_logprobs=ref)
    loss, metrics, grads = ours
    assert loss.item() == 0.0 and float(metrics["kl"]) == 0.0 and float(metrics["clip_ratio"]) == 0.0
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_subsets_and_no_grad(backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(dtype=torch.float64, seed=5)
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=1.3)
    # the trainer's pattern: weight requires grad (no bias), two micro-batches accumulate into .grad
    w = weight.clone().requires_grad_(True)
    h1 = hidden.clone().requires_grad_(True)
    h2 = (hidden.flip(0) * 0.5).requires_grad_(True)
    for h in (h1, h2):
        loss, _ = kernels.linear_grpo_loss(h, w, ids, adv, mask, backend=backend, chunk_size=4, **kw)
        (loss / 2).backward()
    wr = weight.clone().requires_grad_(True)
    want_h = []
    for h in (hidden, hidden.flip(0) * 0.5):
        hr = h.clone().requires_grad_(True)
        (reference_linear_grpo_loss(hr, wr, ids, adv.double(), mask, **kw)[0] / 2).backward()
        want_h.append(hr.grad)
    assert rel_err(w.grad, wr.grad) < 1e-10
    assert rel_err(h1.grad, want_h[0]) < 1e-10 and rel_err(h2.grad, want_h[1]) < 1e-10
    # only the weight needs a gradient (frozen features) / only the hidden states (frozen lm_head)
    w = weight.clone().requires_grad_(True)
    kernels.linear_grpo_loss(hidden, w, ids, adv, mask, backend=backend, chunk_size=4, **kw)[0].backward()
    assert rel_err(w.grad, reference_grpo_w_grad(hidden, weight, ids, adv, mask, kw)) < 1e-10
    h = hidden.clone().requires_grad_(True)
    kernels.linear_grpo_loss(h, weight, ids, adv, mask, backend=backend, chunk_size=4, **kw)[0].backward()
    assert rel_err(h.grad, 2 * want_h[0]) < 1e-10
    # no grad: same loss, no graph
    with torch.no_grad():
        loss, _ = kernels.linear_grpo_loss(hidden.requires_grad_(True), weight, ids, adv, mask, backend=backend,
                                           chunk_size=4, **kw)
    hidden.requires_grad_(False)
    assert loss.grad_fn is None
    want = reference_linear_grpo_loss(hidden, weight, ids, adv.double(), mask, **kw)[0]
    assert abs(loss.item() - want.item()) < 1e-12


def reference_grpo_w_grad(hidden, weight, ids, adv, mask, kw):
    wr = weight.clone().requires_grad_(True)
    reference_linear_grpo_loss(hidden, wr, ids, adv.double(), mask, **kw)[0].backward()
    return wr.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_loss_sliced_hidden_and_single_backward(backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(B=2, L=6, dtype=torch.float64, seed=6)
    full = hidden.clone().requires_grad_(True)  # hidden states of prompt + completion; slice the completion
    w = weight.clone().requires_grad_(True)
    loss, _ = kernels.linear_grpo_loss(full[:, 1:], w, ids[:, 1:], adv, mask[:, 1:], old_logprobs=old[:, 1:],
                                       ref_logprobs=ref[:, 1:], backend=backend, chunk_size=3)
    (-3.0 * loss).backward(retain_graph=True)
    fr, wr = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    rl, _ = reference_linear_grpo_loss(fr[:, 1:], wr, ids[:, 1:], adv.double(), mask[:, 1:],
                                       old_logprobs=old[:, 1:].double(), ref_logprobs=ref[:, 1:].double())
    (-3.0 * rl).backward(retain_graph=True)
    assert rel_err(full.grad, fr.grad) < 1e-10 and rel_err(w.grad, wr.grad) < 1e-10
    assert (full.grad[:, 0] == 0).all()
    # a retained graph backpropagates again, at another scale: gradients accumulate correctly
    (0.5 * loss).backward()
    (0.5 * rl).backward()
    assert rel_err(full.grad, fr.grad) < 1e-10 and rel_err(w.grad, wr.grad) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_selective_logprobs(dtype, backend):
    hidden, weight, bias, ids, *_ = make_batch(B=2, L=5, dtype=dtype, seed=7)
    logp = kernels.linear_selective_logprobs(hidden, weight, ids, bias=bias, temperature=0.8, backend=backend,
                                             chunk_size=3)
    want = reference_logprobs(hidden.double() @ weight.double().t() + bias.double(), ids, 0.8)
    assert logp.dtype == torch.float32 and logp.shape == ids.shape
    assert float((logp.double() - want).abs().max()) < (1e-4 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_step_pattern(backend):
    # old/ref log-probs from linear_selective_logprobs under no_grad, then the loss and backward
    hidden, weight, _, ids, adv, mask, _, _ = make_batch(dtype=torch.float32, seed=8, bias=False)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    with torch.no_grad():
        old = kernels.linear_selective_logprobs(hidden, weight, ids, temperature=0.9, backend=backend)
        ref = kernels.linear_selective_logprobs(hidden, ref_weight, ids, temperature=0.9, backend=backend)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.9,
              loss_type="grpo", importance_level="token", kl_clamp=10.0)
    ours, ref_ = run_both(hidden, weight, None, ids, adv, mask, backend, chunk_size=None, **kw)
    assert_close(ours, ref_, torch.float32, mask)
    assert float(ours[1]["kl"]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_finite_differences(backend):
    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(B=2, L=3, H=3, V=7, dtype=torch.float64, seed=9,
                                                               old_sigma=0.05, ref_sigma=0.5)
    for level in ("token", "sequence"):
        def f(h, w, b):
            return kernels.linear_grpo_loss(h, w, ids, adv, mask, bias=b, old_logprobs=old, ref_logprobs=ref,
                                            beta=0.2, temperature=0.8, importance_level=level, backend=backend,
                                            chunk_size=2)[0]
        inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_matches_liger_fused_linear_grpo(loss_type, importance_level):
    """External oracle: Liger's chunked LigerFusedLinearGRPOLoss on the same settings (its k3 has no clamp)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, bias, ids, adv, mask, old, ref = make_batch(B=4, L=6, H=32, V=1000, dtype=torch.float32,
                                                               seed=10, temperature=0.9, old_sigma=0.4)
    liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, use_ref_model=True, chunk_size=1, epsilon_low=0.2,
                                     epsilon_high=0.28, loss_type=loss_type, max_completion_length=8,
                                     importance_sampling_level=importance_level, temperature=0.9)
    clip_ratios = []
    for use_old in (True, False):
        a = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        liger_loss, liger_metrics = liger(a[0], a[1], ids, mask, adv, bias=a[2], ref_per_token_logps=ref,
                                          old_per_token_logps=old if use_old else None, num_items_in_batch=13)
        liger_loss.backward()
        b = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss, metrics = kernels.linear_grpo_loss(
            b[0], b[1], ids, adv, mask, bias=b[2], old_logprobs=old if use_old else None, ref_logprobs=ref,
            beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.9, loss_type=loss_type,
            importance_level=importance_level, kl_clamp=None, max_completion_length=8, num_items=13,
            backend="torch")
        loss.backward()
        assert abs(loss.item() - liger_loss.item()) <= 1e-5 * max(1.0, abs(liger_loss.item()))
        assert abs(float(metrics["kl"]) - float(liger_metrics[0])) <= 1e-6
        assert abs(float(metrics["clip_ratio"]) - float(liger_metrics[1])) <= 1e-6
        for x, y in zip(b, a):
            assert rel_err(x.grad, y.grad) < 1e-5
        clip_ratios.append(float(metrics["clip_ratio"]))
    if importance_level == "token":
        assert clip_ratios[0] > 0  # with old log-probs some tokens clip: the clipped branch is compared too


def test_chunk_rows_from_hidden_and_vocab_sizes():
    H, V = 3584, 152064
    c = chunk_rows(4096, H, V, torch.float32, "cpu")
    assert c % 64 == 0 and c >= 64
    assert c * (V * 4 + H * 8) <= CHUNK_BUDGET_BYTES["cpu"] < 0.3e9  # the CPU path's extra memory bound
    c16 = chunk_rows(16384, H, V, torch.bfloat16, "cuda")
    assert c16 % 64 == 0 and c16 * V * 6 <= CHUNK_BUDGET_BYTES["cuda"] and c16 >= 1024  # GEMM-sized on GPU
    assert chunk_rows(10, 64, 1000, torch.float32, "cpu") == 10  # tiny problems: one chunk
    assert chunk_rows(4096, 64, 10**9, torch.float32, "cpu") == 1  # never zero rows


def test_autocast_region_does_not_change_the_result():
    # a trainer may call the loss inside torch.autocast: our GEMMs keep the inputs' dtype
    hidden, weight, _, ids, adv, mask, old, ref = make_batch(dtype=torch.float32, seed=11, bias=False)
    kw = dict(old_logprobs=old, ref_logprobs=ref, backend="torch", chunk_size=4)
    w1 = weight.clone().requires_grad_(True)
    plain, _ = kernels.linear_grpo_loss(hidden, w1, ids, adv, mask, **kw)
    plain.backward()
    w2 = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = kernels.linear_grpo_loss(hidden, w2, ids, adv, mask, **kw)
    cast.backward()
    assert cast.dtype == torch.float32 and cast.item() == plain.item()
    assert torch.equal(w1.grad, w2.grad)
