"""Bad input raises ValueError naming the argument (never an out-of-bounds read); `import kernels` stays light."""

import os
import subprocess
import sys

import pytest
import torch

import kernels

B, L, V, H = 2, 3, 11, 4


def batch():
    g = torch.Generator().manual_seed(0)
    return dict(
        logits=torch.randn(B, L, V, generator=g),
        hidden=torch.randn(B, L, H, generator=g),
        weight=torch.randn(V, H, generator=g),
        ids=torch.randint(0, V, (B, L), generator=g),
        adv=torch.randn(B, generator=g),
        mask=torch.ones(B, L, dtype=torch.bool),
        lp=torch.full((B, L), -2.0),
    )


def call_grpo_loss(d, **over):
    """kernels.grpo_loss on the batch d with some arguments replaced."""
    args = dict(logits=d["logits"], completion_ids=d["ids"], advantages=d["adv"], completion_mask=d["mask"],
                old_logprobs=d["lp"], ref_logprobs=d["lp"], backend="torch")
    args.update(over)
    return kernels.grpo_loss(**args)


@pytest.mark.parametrize("bad,match", [
    (lambda d: dict(completion_ids=d["ids"] + V), r"completion_ids must lie in \[0, 11\)"),
    (lambda d: dict(completion_ids=d["ids"] - V), r"completion_ids must lie in \[0, 11\)"),
    (lambda d: dict(completion_ids=d["ids"].float()), "completion_ids must be an integer tensor"),
    (lambda d: dict(completion_ids=d["ids"][:, :1]), r"logits must have shape \(B, L, V\) or the model's full "
     r"\(B, L \+ 1, V\) for completion_ids of shape \(B, L\) = \(2, 1\); got logits of shape \(2, 3, 11\)"),
    (lambda d: dict(completion_ids=d["ids"][:1]), r"for completion_ids of shape \(B, L\) = \(1, 3\)"),
    (lambda d: dict(completion_mask=d["mask"][:1]), r"completion_mask must have shape \(B, L\)"),
    (lambda d: dict(advantages=d["adv"][:1]), r"advantages must have shape \(B,\)"),
    (lambda d: dict(advantages=d["adv"][:, None]), "advantages must have 1 dimensions"),
    (lambda d: dict(old_logprobs=d["lp"][:, :1]), r"old_logprobs must have shape \(B, L\)"),
    (lambda d: dict(ref_logprobs=d["lp"].long()), "ref_logprobs must be a float tensor"),
    (lambda d: dict(logits=d["logits"][0]), "logits must have 3 dimensions"),
    (lambda d: dict(logits=d["logits"].long()), "logits has dtype torch.int64"),
    (lambda d: dict(logits=[1.0]), "logits must be a torch.Tensor"),
    (lambda d: dict(ref_logprobs=None), "ref_logprobs is required when beta > 0"),
    (lambda d: dict(loss_type="ppo"), "loss_type must be one of"),
    (lambda d: dict(importance_level="seq"), "importance_level must be one of"),
    (lambda d: dict(temperature=0.0), "temperature must be > 0"),
    (lambda d: dict(eps_low=-0.1), "eps_low must be >= 0"),
    (lambda d: dict(beta=float("nan")), "beta must be finite"),
    (lambda d: dict(kl_clamp=0), "kl_clamp must be > 0"),
    (lambda d: dict(max_completion_length=0), "max_completion_length must be a positive int"),
    (lambda d: dict(num_items=-1), "num_items must be >= 0"),
    (lambda d: dict(backend="cuda"), "backend must be one of"),
])
def test_grpo_loss_rejects(bad, match):
    d = batch()
    with pytest.raises(ValueError, match=match):
        call_grpo_loss(d, **bad(d))


def test_masked_positions_may_hold_ignore_ids():
    d = batch()
    d["ids"][0, 2] = -100
    d["mask"][0, 2] = False
    loss, _ = kernels.grpo_loss(d["logits"], d["ids"], d["adv"], d["mask"], ref_logprobs=d["lp"], backend="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bad,match", [
    (lambda d: dict(weight=d["weight"][:, :2]), r"weight must have shape \(V, H\) with H = 4"),
    (lambda d: dict(weight=d["weight"].double()), "weight has dtype torch.float64 but hidden has torch.float32"),
    (lambda d: dict(hidden=d["hidden"][0]), "hidden must have 3 dimensions"),
    (lambda d: dict(bias=torch.zeros(V + 1)), r"bias must have shape \(V,\) = \(11,\)"),
    (lambda d: dict(bias=torch.zeros(V, dtype=torch.bfloat16)), "bias has dtype torch.bfloat16"),
    (lambda d: dict(completion_ids=d["ids"] + 100), r"completion_ids must lie in \[0, 11\)"),
    (lambda d: dict(chunk_size=0), "chunk_size must be a positive int"),
])
def test_linear_grpo_loss_rejects(bad, match):
    d = batch()
    args = dict(hidden=d["hidden"], weight=d["weight"], completion_ids=d["ids"], advantages=d["adv"],
                completion_mask=d["mask"], ref_logprobs=d["lp"], backend="torch")
    args.update(bad(d))
    with pytest.raises(ValueError, match=match):
        kernels.linear_grpo_loss(**args)


def test_selective_logprobs_reject_bad_ids_and_shapes():
    d = batch()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 11\)"):
        kernels.selective_logprobs(d["logits"], d["ids"] + V, backend="torch")
    with pytest.raises(ValueError, match=r"for ids of shape \(B, L\) = \(1, 3\); got logits of shape \(2, 3, 11\)"):
        kernels.selective_logprobs(d["logits"], d["ids"][:1], backend="torch")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 11\)"):
        kernels.linear_selective_logprobs(d["hidden"], d["weight"], d["ids"] - V, backend="torch")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kernels.linear_selective_logprobs(d["hidden"], d["weight"], d["ids"], temperature=-1.0, backend="torch")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    d = batch()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.grpo_loss(d["logits"], d["ids"], d["adv"], d["mask"], beta=0.0, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.linear_selective_logprobs(d["hidden"], d["weight"], d["ids"], backend="triton")
    # "auto" on CPU tensors is the pure-torch path and needs no interpreter
    loss, _ = kernels.grpo_loss(d["logits"], d["ids"], d["adv"], d["mask"], beta=0.0, backend="auto")
    assert torch.isfinite(loss)


def test_import_is_light_and_has_no_version():
    # transformers probes a top-level package named "kernels": importing it must be cheap and safe
    code = ("import sys, kernels; assert 'triton' not in sys.modules, 'kernels imported triton'; "
            "assert not hasattr(kernels, '__version__'); "
            "assert kernels.__all__ == ['grpo_loss', 'linear_grpo_loss', 'selective_logprobs', "
            "'linear_selective_logprobs']")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), timeout=120)
