"""Worker of tests/test_shared_prefix.py's 2-process runs (torchrun): one engine (fsdp2 | deepspeed
ZeRO-3) with activation checkpointing, the reference and old log-probs and the policy loss + backward
of one prompt group per rank (rank 0 a video, rank 1 an image), repeated then shared (twice: the
second shared run proves the gradients were cleared between runs); writes each rank's differences.

    torchrun --nproc_per_node=2 tests/shared_prefix_worker.py ENGINE CKPT DATA_FILE OUT_DIR
"""

import json
import os
import sys

import torch


def full_grads(cfg, policy) -> dict:
    if cfg.train.engine == "fsdp2":
        return {n: p.grad.full_tensor().clone() for n, p in policy.module.named_parameters() if p.grad is not None}
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in policy.module.named_parameters() if p.requires_grad}


def clear_grads(cfg, policy) -> None:
    if cfg.train.engine == "fsdp2":
        for p in policy.module.parameters():
            p.grad = None
    else:
        policy.engine.optimizer.zero_grad()  # ZeRO-3: micro step 0, the next gradients overwrite its partitions


def main(engine: str, ckpt: str, data_file: str, out_dir: str) -> None:
    from videor1 import distributed as D
    from videor1 import session
    from videor1.config import Config
    from videor1.forward import build_inputs
    from videor1.rollout import prepare_prompt

    D.init_distributed(300.0)
    rank = D.rank()
    cfg = Config()
    cfg.model.path, cfg.train.engine, cfg.model.gradient_checkpointing = ckpt, engine, True
    cfg.algo.kernel_backend = "torch"
    data = cfg.data
    data.fps, data.video_min_pixels, data.video_max_pixels = 8.0, 3136, 12544
    data.image_min_pixels, data.image_max_pixels = 3136, 12544
    processor, policy, reference = session.build_models(cfg, 1, 1, with_reference=True)
    with open(data_file) as f:
        rows = json.load(f)
    kind = ["video", "image"][rank % 2]
    prompt = prepare_prompt(next(r for r in rows if r["data_type"] == kind), processor, data,
                            os.path.dirname(data_file), shuffled=False).to(policy.device)
    g = torch.Generator().manual_seed(10 + rank)
    lengths = torch.tensor([6, 2, 4, 1])
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    ids = torch.randint(10, 700, mask.shape, generator=g).masked_fill(mask == 0, 0)
    adv = torch.randn(4, generator=g)
    P = prompt.input_ids.numel()

    results = []
    for shared in (False, True, True):
        inputs = build_inputs(prompt, ids, mask, shared=shared)
        with torch.no_grad():
            ref = reference(inputs, P, ids, mode="logprobs", completion_mask=mask)
            old = policy(inputs, P, ids, mode="logprobs", completion_mask=mask)
        loss, m = policy(inputs, P, ids, mode="loss", advantages=adv, completion_mask=mask,
                         loss_kwargs=dict(beta=0.04, ref_logprobs=ref, old_logprobs=old + 0.01 * mask))
        policy.backward(loss)
        results.append(dict(ref=ref, old=old, loss=loss.detach(), kl=m["kl"], clip=m["clip_ratio"],
                            grads=full_grads(cfg, policy)))
        clear_grads(cfg, policy)

    def diff(a, b) -> dict:
        worst = max(float((a["grads"][n] - b["grads"][n]).norm() / a["grads"][n].norm().clamp_min(1e-30))
                    for n in a["grads"])
        return {"ref": float((a["ref"] - b["ref"]).abs().max()), "old": float((a["old"] - b["old"]).abs().max()),
                "loss": float((a["loss"] - b["loss"]).abs()), "kl": float((a["kl"] - b["kl"]).abs()),
                "grad_rel": worst, "n_grads": len(a["grads"]),
                "grad_norm": float(torch.stack([g.norm() for g in a["grads"].values()]).norm())}

    report = {"rank": rank, "kind": kind, "engine": engine, "loss": float(results[0]["loss"]),
              "shared_vs_repeated": diff(results[0], results[1]), "shared_vs_shared": diff(results[1], results[2])}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    D.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:5])
