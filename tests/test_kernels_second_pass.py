"""The kernels' second pass: padding costs nothing, the full-logits form, in-place on views, no host syncs.

CPU, both backends ("triton" under TRITON_INTERPRET=1). The oracle is kernels.reference in fp64 on the
clean values; garbage (NaN, -inf, huge) at every masked position must not change anything.
"""

import importlib
import os

import pytest
import torch

import kernels
from kernels import triton_rows
from kernels._checks import check_ids
from kernels._grads import scale_buffer_
from kernels.reference import reference_grpo_loss, reference_logprobs

lin = importlib.import_module("kernels.linear_grpo_loss")  # the module (the package exports a same-named function)
BACKENDS = ["torch", "triton"]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1.5e-2)}


@pytest.fixture(autouse=True, scope="module")
def _need_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run these tests with TRITON_INTERPRET=1 (the Triton kernels run in the interpreter)")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def ragged(B=4, L=7, V=1000, dtype=torch.float32, seed=0, full=True):
    """Full logits [B, L + 1, V] (or [B, L, V]), ids with -100 at padding, a ragged mask, old/ref log-probs.

    Lengths L, 3, 0, 1: a full completion, a padded one, an empty one, a single token. Every masked
    logits row holds garbage: NaN, -inf or 1e30, and so does the unused last position."""
    g = torch.Generator().manual_seed(seed)
    T = L + 1 if full else L
    clean = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    lengths = torch.tensor([L, 3, 0, 1][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64).float()
    with torch.no_grad():
        logp = reference_logprobs(clean[:, :L], ids, 0.8)
    old = (logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    dirty = clean.clone()
    garbage = [float("nan"), float("-inf"), 1e30]
    for k, (b, t) in enumerate((~mask).nonzero().tolist()):
        dirty[b, t] = garbage[k % 3]
    if full:
        dirty[:, L] = float("nan")
    ids = torch.where(mask, ids, torch.full_like(ids, -100))
    old = torch.where(mask, old, torch.full_like(old, float("nan")))
    ref = torch.where(mask, ref, torch.full_like(ref, float("-inf")))
    return clean, dirty.to(dtype), ids, adv, mask, old, ref


KW = dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.8, kl_clamp=10.0)


def reference(clean, ids, adv, mask, old, ref, L, **kw):
    """fp64 reference loss, metrics and d loss / d logits at clean's shape (0 on masked rows and the tail)."""
    x = clean.detach().double().requires_grad_(True)
    safe_ids = torch.where(mask, ids, torch.zeros_like(ids))
    loss, metrics = reference_grpo_loss(x[:, :L], safe_ids, adv.double(), mask,
                                        torch.where(mask, old, 0).double(), torch.where(mask, ref, 0).double(), **kw)
    loss.backward()
    return loss.detach(), metrics, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full", [True, False], ids=["full", "sliced"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_garbage_in_masked_rows_fp64_reference(backend, dtype, full, level):
    L = 7
    clean, dirty, ids, adv, mask, old, ref = ragged(L=L, dtype=dtype, full=full, seed=1)
    kw = dict(KW, importance_level=level)
    want_loss, want_m, want_grad = reference(clean.to(dtype).double() if dtype != torch.float64 else clean,
                                             ids, adv, mask, old, ref, L, **kw)
    x = dirty.clone().requires_grad_(True)
    loss, metrics = kernels.grpo_loss(x, ids, adv, mask, old, ref, backend=backend, **kw)
    loss.backward()
    vtol, gtol = TOL[dtype]
    assert abs(loss.item() - want_loss.item()) <= vtol * max(1.0, abs(want_loss.item()))
    assert abs(metrics["kl"].item() - want_m["kl"].item()) <= vtol * max(1.0, want_m["kl"].item())
    assert abs(metrics["clip_ratio"].item() - want_m["clip_ratio"].item()) <= 1e-6
    assert x.grad.shape == dirty.shape and torch.isfinite(x.grad.float()).all()
    assert (x.grad[:, :L][~mask] == 0).all(), "masked rows must get exact zeros"
    if full:
        assert (x.grad[:, L] == 0).all(), "the unused last position gets a zero gradient"
    assert rel_err(x.grad, want_grad) <= gtol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_full_form_equals_sliced_form(backend, level):
    L = 6
    _, logits, ids, adv, mask, old, ref = ragged(L=L, full=True, seed=2)
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros(()))
    kw = dict(KW, importance_level=level)
    a = logits.clone().requires_grad_(True)
    loss_a, m_a = kernels.grpo_loss(a, ids, adv, mask, old, ref, backend=backend, **kw)
    loss_a.backward()
    b = logits.clone().requires_grad_(True)
    loss_b, m_b = kernels.grpo_loss(b[:, :-1], ids, adv, mask, old, ref, backend=backend, **kw)
    loss_b.backward()  # through autograd's slice backward
    assert loss_a.item() == loss_b.item()
    assert m_a["kl"].item() == m_b["kl"].item() and m_a["clip_ratio"].item() == m_b["clip_ratio"].item()
    assert torch.equal(a.grad, b.grad)
    with torch.no_grad():
        lp_full = kernels.selective_logprobs(logits, torch.where(mask, ids, 0), 0.8, backend=backend)
        lp_view = kernels.selective_logprobs(logits[:, :-1], torch.where(mask, ids, 0), 0.8, backend=backend)
        lp_masked = kernels.selective_logprobs(logits, ids, 0.8, mask, backend=backend)
    assert torch.equal(lp_full, lp_view)
    assert torch.equal(lp_masked[mask], lp_full[mask]) and (lp_masked[~mask] == 0).all()


def _model_logits(base, w):
    """Logits as a model makes them: the output of an op (not a leaf), so they can be overwritten."""
    return base @ w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["full", "view"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_on_full_form_and_on_view(backend, form, level):
    L = 6
    _, logits, ids, adv, mask, old, ref = ragged(L=L, V=300, full=True, seed=3)
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros(())).clamp(-30, 30)
    kw = dict(KW, importance_level=level)
    V = logits.shape[-1]

    def run(inplace):
        w = torch.eye(V, dtype=torch.float32).requires_grad_(True)
        z = _model_logits(logits, w)
        x = z if form == "full" else z[:, :-1]
        loss, metrics = kernels.grpo_loss(x, ids, adv, mask, old, ref, backend=backend, inplace=inplace, **kw)
        (2.5 * loss).backward()
        return loss.detach(), metrics, w.grad, z

    want_loss, want_m, want_w, _ = run(False)
    loss, m, got_w, z = run(True)
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * max(1.0, abs(want_loss.item()))
    assert m["kl"].item() == pytest.approx(want_m["kl"].item(), rel=1e-6, abs=1e-9)
    assert rel_err(got_w, want_w) < 1e-5
    # the buffer now holds 2.5 * d loss / d logits (scaled by grad_output), zeros on masked rows and the tail
    assert (z[:, :L][~mask] == 0).all() and (z[:, L] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["full", "view"])
def test_inplace_version_counter_catches_other_uses(backend, form):
    L = 5
    _, logits, ids, adv, mask, old, ref = ragged(L=L, V=200, full=True, seed=4)
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros(()))
    w = torch.eye(200).requires_grad_(True)
    z = logits @ w
    x = z if form == "full" else z[:, :-1]
    other = (z * w[0]).sum()  # autograd saved z (to get d other / d w)
    v0 = z._version
    loss, _ = kernels.grpo_loss(x, ids, adv, mask, old, ref, backend=backend, inplace=True, **KW)
    assert z._version > v0, "the overwritten buffer's version must move"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()
    # and a change of the buffer after the call is caught at backward too
    z = logits @ w
    loss, _ = kernels.grpo_loss(z if form == "full" else z[:, :-1], ids, adv, mask, old, ref, backend=backend,
                                inplace=True, **KW)
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_linear_garbage_hidden_in_masked_rows(backend, dtype, level):
    """Masked rows never meet the lm_head: NaN / inf hidden states there change nothing, d_weight included."""
    g = torch.Generator().manual_seed(5)
    B, L, H, V = 4, 7, 24, 300
    lengths = torch.tensor([7, 3, 0, 1])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    ids = torch.randint(0, V, (B, L), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64).float()
    old = torch.randn(B, L, generator=g).float() - 6
    ref = torch.randn(B, L, generator=g).float() - 6
    kw = dict(KW, importance_level=level)
    h_r, w_r, b_r = (t.to(dtype).double().clone().requires_grad_(True) for t in (hidden, weight, bias))
    logits = h_r @ w_r.t() + b_r
    ref_loss, _ = reference_grpo_loss(logits, ids, adv.double(), mask, old.double(), ref.double(), **kw)
    ref_loss.backward()
    dirty = hidden.clone()
    dirty[~mask] = torch.tensor([float("nan"), float("inf"), -1e30], dtype=torch.float64).repeat(
        int((~mask).sum()) // 3 + 1)[: int((~mask).sum())].unsqueeze(1)
    h, w, b = (t.to(dtype).clone().requires_grad_(True) for t in (dirty, weight, bias))
    ids_bad = torch.where(mask, ids, torch.full_like(ids, -100))
    loss, _ = kernels.linear_grpo_loss(h, w, ids_bad, adv, mask, bias=b, old_logprobs=old, ref_logprobs=ref,
                                       backend=backend, chunk_size=4, **kw)
    loss.backward()
    vtol, gtol = TOL[dtype]
    if dtype == torch.bfloat16:  # the linear path's bf16 tolerance (tests/test_kernels_linear_grpo_loss.py)
        gtol = 3e-2
    assert abs(loss.item() - ref_loss.item()) <= vtol * max(1.0, abs(ref_loss.item()))
    assert (h.grad[~mask] == 0).all()
    for got, want in ((h.grad, h_r.grad), (w.grad, w_r.grad), (b.grad, b_r.grad)):
        assert torch.isfinite(got.float()).all()
        assert rel_err(got, want) <= gtol
    with torch.no_grad():
        lp = kernels.linear_selective_logprobs(h, w, ids_bad, b, 0.8, mask, backend=backend, chunk_size=4)
        want_lp = reference_logprobs((h_r @ w_r.t() + b_r) / 1.0, ids, 0.8)
    assert (lp[~mask] == 0).all() and torch.isfinite(lp).all()
    assert float((lp[mask].double() - want_lp[mask]).abs().max()) <= (5e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_counted_rows_meet_the_lm_head(backend, monkeypatch):
    """The GEMMs see the counted rows only (time follows counted tokens, not the padded length)."""
    seen = []
    real = lin._logits_into

    def spy(buf, h, weight, bias):
        seen.append(h.shape[0])
        return real(buf, h, weight, bias)

    monkeypatch.setattr(lin, "_logits_into", spy)
    g = torch.Generator().manual_seed(6)
    B, L, H, V = 4, 16, 8, 50
    mask = torch.arange(L)[None, :] < torch.tensor([16, 5, 0, 3])[:, None]
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, L), generator=g)
    loss, _ = kernels.linear_grpo_loss(hidden, weight, ids, torch.randn(B, generator=g), mask, beta=0.0,
                                       backend=backend, chunk_size=8)
    assert sum(seen) == int(mask.sum()) == 24 and max(seen) <= 8
    seen.clear()
    kernels.linear_selective_logprobs(hidden, weight, ids, mask=mask, backend=backend, chunk_size=8)
    assert sum(seen) == 24
    seen.clear()
    kernels.linear_selective_logprobs(hidden, weight, ids, backend=backend, chunk_size=8)
    assert sum(seen) == B * L  # no mask: every row


def test_torch_logits_path_reads_counted_rows_only(monkeypatch):
    from kernels import torch_rows

    seen = []
    real = torch_rows.loss_rows

    def spy(x, tok, hp, out, dx=None, scratch=False):
        seen.append(x.shape[0])
        return real(x, tok, hp, out, dx=dx, scratch=scratch)

    monkeypatch.setattr(torch_rows, "loss_rows", spy)
    _, logits, ids, adv, mask, old, ref = ragged(L=7, V=100, seed=7)
    kernels.grpo_loss(logits, ids, adv, mask, old, ref, backend="torch", **KW)
    assert sum(seen) == int(mask.sum())


def test_narrow_in_place_is_exact_and_allocates_no_second_buffer():
    g = torch.Generator().manual_seed(8)
    for V, H, dtype in ((37, 5, torch.bfloat16), (64, 33, torch.float16), (1000, 7, torch.bfloat16)):
        acc = torch.randn(V, H, generator=g) * 100
        want = acc.to(dtype)
        ptr = acc.data_ptr()
        got = lin.narrow_(acc, dtype, block_rows=3)
        assert got.dtype == dtype and got.shape == (V, H) and got.is_contiguous()
        assert got.data_ptr() == ptr, "the result must live in the accumulator's own storage"
        assert torch.equal(got, want)
    acc = torch.randn(4, 4)
    assert lin.narrow_(acc, torch.float32) is acc


def test_weight_gradient_chunk_is_compute_bound_at_7b():
    c = lin.chunk_rows(16384, 3584, 152064, torch.bfloat16, "cuda")
    assert c >= 1300 and c % 64 == 0  # d_weight intensity ~c/4 flop/byte over an H100's ridge (~295)
    assert lin.chunk_rows(16384, 3584, 152064, torch.float32, "cpu") == 384  # the CPU budget is unchanged


@pytest.mark.parametrize("ratio", [1.0, 2.5, 0.125])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_triton_scale_kernel(ratio, dtype):
    g = torch.Generator().manual_seed(9)
    t = (torch.randn(70001, generator=g) * 3).to(dtype)
    want = (t.double() * ratio).to(dtype) if dtype != torch.bfloat16 else (t.float() * ratio).to(dtype)
    triton_rows.scale_(t, torch.tensor([ratio]))
    if dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 toward zero (GPUs: to nearest): one ulp
        assert torch.allclose(t.float(), want.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(t, want)
    t2 = torch.ones(3, 5, dtype=dtype)
    scale_buffer_(t2, torch.tensor(4.0), "torch")  # the CPU branch
    assert torch.equal(t2, torch.full((3, 5), 4.0, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_rescales_saved_gradients(backend):
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 30, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss, _ = kernels.linear_grpo_loss(hidden, weight, ids, torch.randn(2, generator=g), mask, beta=0.0,
                                       backend=backend)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = weight.grad.clone()
    weight.grad = None
    loss.backward(torch.tensor(-0.5))
    assert torch.allclose(weight.grad, first * -0.25, rtol=1e-6, atol=1e-7)


def test_ids_device_side_check_and_num_items_tensor():
    ids = torch.tensor([[0, 5, 11]])
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 11\)"):
        check_ids("ids", ids, 11, on_device=True)  # torch._assert_async: raises at once on the CPU
    assert torch.equal(check_ids("ids", ids, 12, on_device=True), ids)
    with pytest.raises(ValueError, match=r"got values in \[0, 11\]"):
        check_ids("ids", ids, 11)
    # a tensor num_items stays a tensor (no .item()): same loss as the number
    _, logits, ids, adv, mask, old, ref = ragged(L=5, V=50, seed=11, full=False)
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros(()))
    a, _ = kernels.grpo_loss(logits, ids, adv, mask, old, ref, loss_type="dapo", num_items=7.0, backend="torch")
    b, _ = kernels.grpo_loss(logits, ids, adv, mask, old, ref, loss_type="dapo", num_items=torch.tensor(7),
                             backend="torch")
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="num_items must be a number or a one-element tensor"):
        kernels.grpo_loss(logits, ids, adv, mask, old, ref, loss_type="dapo", num_items=torch.ones(2))


def test_launch_under_the_tensors_device(monkeypatch):
    """Every launch enters device_guard(tensor); for a cuda:1 tensor that is torch.cuda.device(1)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = torch.empty(4, device="cuda:1")
    guard = triton_rows.device_guard(t)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    real = triton_rows.device_guard
    monkeypatch.setattr(triton_rows, "device_guard", lambda x: (seen.append(x.device), real(x))[1])
    _, logits, ids, adv, mask, old, ref = ragged(L=4, V=64, seed=12, full=True)
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros(())).requires_grad_(True)
    loss, _ = kernels.grpo_loss(logits, ids, adv, mask, old, ref, backend="triton", **KW)
    loss.backward()
    assert len(seen) == 2 and all(d == logits.device for d in seen)


def test_launch_table():
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert triton_rows.launch_config(152064, torch.bfloat16) == dict(BLOCK_V=4096, num_warps=8)
        assert triton_rows.launch_config(152064, torch.float32) == dict(BLOCK_V=2048, num_warps=8)
        assert triton_rows.launch_config(1000, torch.bfloat16) == dict(BLOCK_V=1024, num_warps=4)
        triton_rows.LAUNCH_OVERRIDE = (8192, 16)
        assert triton_rows.launch_config(152064, torch.bfloat16) == dict(BLOCK_V=8192, num_warps=16)
    finally:
        triton_rows.LAUNCH_OVERRIDE = None
        os.environ["TRITON_INTERPRET"] = "1"


def test_launch_sweep_script_runs(tmp_path):
    """benchmarks/sweep_row_kernel.py (the GPU check's sweep) end to end on the CPU: --smoke, tiny shapes."""
    import csv
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "sweep_row_kernel.py"), "--smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "row_kernel_sweep_cpu_smoke.csv")))
    assert {r["kernel"] for r in rows} == {"logits-bf16", "linear-fp32"}
    assert {r["provider"] for r in rows} == {"BLOCK_V=1024,warps=4", "BLOCK_V=2048,warps=4"}


def test_fused_linear_runs_on_fake_tensors():
    """Under FakeTensorMode (shapes, no data: how a 7B step is simulated without GPUs) nothing reads data:
    the id check is the device-side form, every token counts, and the gradient hand-over does not read
    grad_output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(2, 6, 16, requires_grad=True)
        weight = torch.empty(100, 16, requires_grad=True)
        ids = torch.zeros(2, 6, dtype=torch.long)
        mask = torch.ones(2, 6)
        loss, metrics = kernels.linear_grpo_loss(hidden, weight, ids, torch.zeros(2), mask, beta=0.0,
                                                 backend="torch")
        loss.backward()
        logp = kernels.linear_selective_logprobs(hidden, weight, ids, backend="torch")
        assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
        assert logp.shape == (2, 6) and loss.shape == ()
