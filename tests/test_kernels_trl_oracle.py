"""TRL's fused LM head (trl.kernels.chunked_logprob.ChunkedLogProbFunction, TRL 1.16) as an external oracle.

An implementation written by other people, of the same idea (log-probs of hidden @ weight.T + bias in
vocabulary chunks, an online logsumexp, a backward that recomputes the tiles): our lm_head-fused kernels
must agree with it, on the CPU (TRL folds its tiles in torch off Triton devices; ours runs backend="torch").

    (i)  kernels.linear_selective_logprobs == TRL's log-probs
    (ii) kernels.linear_grpo_loss (loss and d_hidden, d_weight, d_bias) == TRL's log-probs, called as
         GRPOTrainer calls them (counted rows compacted, or every position scored), fed to
         kernels.reference.reference_grpo_from_logprobs and backpropagated by autograd

TRL runs with small vocabulary chunks (its chunk_size) so every call folds several, the last one ragged.

Tolerances: TRL keeps its statistics (running max, sum of exps, target logit, log Z) and its gradient
accumulators in float32 whatever the input dtype (its log-probs come back float32 even for float64 inputs,
and its backward GEMMs run in float32). So TRL is a float32-accurate oracle only: with float64 inputs the
tight check is that ours equals the exact float64 formula (1e-10) while TRL is within float32 rounding of
both; with float32 inputs ours and TRL agree to ~1e-5.
"""

import pytest
import torch

trl_chunked = pytest.importorskip("trl.kernels.chunked_logprob", reason="trl is not installed (requirements.txt)")
ChunkedLogProbFunction = trl_chunked.ChunkedLogProbFunction

import kernels  # noqa: E402
from kernels.reference import reference_grpo_from_logprobs, reference_logprobs  # noqa: E402

LOSS_KW = dict(beta=0.04, eps_low=0.2, eps_high=0.2, kl_clamp=10.0)
TRL_CHUNK = 128  # vocabulary columns per TRL tile: V = 1000 -> 8 tiles, the last 104 wide


def trl_logprobs(hidden2d, weight, bias, targets, temperature, chunk_size=TRL_CHUNK):
    """ChunkedLogProbFunction.apply exactly as GRPOTrainer's fused head calls it (log-probs only)."""
    logp, *rest = ChunkedLogProbFunction.apply(hidden2d, weight, bias, targets, temperature, chunk_size, None, 1.0, ())
    assert all(x is None for x in rest)
    return logp


def exact_logprobs(hidden, weight, bias, ids, temperature):
    logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
    return reference_logprobs(logits, ids, temperature)


def make(B, L, H, V, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.2).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, L), generator=g)
    return hidden, weight, b, ids, g


# ---- (i) log-probs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("trl_chunk", [TRL_CHUNK, 333])
def test_linear_selective_logprobs_matches_trl(dtype, bias, temperature, trl_chunk):
    hidden, weight, b, ids, _ = make(1, 37, 24, 1000, dtype, seed=1, bias=bias)
    ours = kernels.linear_selective_logprobs(hidden, weight, ids, b, temperature, backend="torch", chunk_size=5)
    with torch.no_grad():
        theirs = trl_logprobs(hidden[0], weight, b, ids[0], temperature, trl_chunk).view(1, 37)
    assert theirs.dtype == torch.float32  # TRL: float32 statistics, whatever the input dtype
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(theirs).all() and theirs.max() < 0
    exact = exact_logprobs(hidden, weight, b, ids, temperature)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-10)  # ours: exact in float64
        torch.testing.assert_close(theirs.double(), exact, rtol=2e-6, atol=2e-6)  # TRL: float32 rounding
        torch.testing.assert_close(ours, theirs.double(), rtol=2e-6, atol=2e-6)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- (ii) the GRPO loss and its gradients ---------------------------------------------------------------------

def ragged_batch(dtype, seed=2, B=5, L=9, H=24, V=1000, bias=True, temperature=0.7):
    hidden, weight, b, ids, g = make(B, L, H, V, dtype, seed, bias)
    lengths = torch.tensor([9, 4, 1, 7, 0])  # right-padded completions, one of them empty
    mask = (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp = exact_logprobs(hidden, weight, b, ids, temperature)
    old = logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)  # some ratios clip
    ref = logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, -100))  # padding ids: what a GRPO batch may carry
    return hidden, weight, b, ids, adv, mask, old, ref


def trl_grpo(hidden, weight, bias, ids, adv, mask, old, ref, temperature, compact):
    """TRL's fused head as GRPOTrainer uses it, then the GRPO loss (float64) on its per-token log-probs.

    compact=True: the counted rows only (TRL on CUDA/XPU), masked_scatter back into [B, L] zeros;
    compact=False: every position, labels clamped to >= 0, masked_fill (TRL off Triton devices)."""
    m = mask.bool()
    if compact:
        x = trl_logprobs(hidden[m], weight, bias, ids[m], temperature)
        logp = x.new_zeros(m.shape).masked_scatter(m, x)
    else:
        x = trl_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, bias, ids.clamp(min=0).reshape(-1), temperature)
        logp = x.view(m.shape).masked_fill(~m, 0)
    return reference_grpo_from_logprobs(logp.double(), adv, mask, old, ref, **LOSS_KW)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "all-positions"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_linear_grpo_loss_matches_trl(compact, bias):
    temperature = 0.7
    hidden, weight, b, ids, adv, mask, old, ref = ragged_batch(torch.float64, bias=bias, temperature=temperature)
    def leaves():
        return [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, b)]

    ours = leaves()
    loss, metrics = kernels.linear_grpo_loss(ours[0], ours[1], ids, adv, mask, bias=ours[2], old_logprobs=old,
                                             ref_logprobs=ref, temperature=temperature, backend="torch", chunk_size=4,
                                             **LOSS_KW)
    loss.backward()

    theirs = leaves()
    trl_loss, trl_metrics = trl_grpo(theirs[0], theirs[1], theirs[2], ids, adv, mask, old, ref, temperature, compact)
    trl_loss.backward()

    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item()))
    assert abs(float(metrics["kl"]) - float(trl_metrics["kl"])) <= 1e-6
    assert abs(float(metrics["clip_ratio"]) - float(trl_metrics["clip_ratio"])) <= 1e-12  # same tokens clip
    for name, a, t in zip(("hidden", "weight", "bias"), ours, theirs):
        if a is None:
            continue
        assert a.grad.dtype == torch.float64 and t.grad.dtype == torch.float64
        assert torch.isfinite(a.grad).all(), name
        assert rel_err(a.grad, t.grad) <= 1e-5, (name, rel_err(a.grad, t.grad))
    # padding positions get no gradient in either
    pad = ~mask.bool()
    assert ours[0].grad[pad].abs().max() == 0 and theirs[0].grad[pad].abs().max() == 0


def test_linear_grpo_loss_matches_trl_float32():
    """float32 inputs (what the CPU trainer runs): both sides accumulate in float32."""
    temperature = 1.0
    hidden, weight, b, ids, adv, mask, old, ref = ragged_batch(torch.float32, seed=3, bias=True,
                                                               temperature=temperature)
    old, ref = old.float(), ref.float()
    def leaves():
        return [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    ours = leaves()
    loss, _ = kernels.linear_grpo_loss(ours[0], ours[1], ids, adv.float(), mask, bias=ours[2], old_logprobs=old,
                                       ref_logprobs=ref, temperature=temperature, backend="torch", chunk_size=4,
                                       **LOSS_KW)
    loss.backward()
    theirs = leaves()
    m = mask.bool()
    x = trl_logprobs(theirs[0][m], theirs[1], theirs[2], ids[m], temperature)
    logp = x.new_zeros(m.shape).masked_scatter(m, x)
    trl_loss, _ = reference_grpo_from_logprobs(logp, adv.float(), mask, old, ref, **LOSS_KW)
    trl_loss.backward()
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item()))
    for name, a, t in zip(("hidden", "weight", "bias"), ours, theirs):
        assert rel_err(a.grad, t.grad) <= 5e-5, (name, rel_err(a.grad, t.grad))
