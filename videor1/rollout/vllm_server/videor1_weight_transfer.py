"""Weight transfer from the trainer to the vLLM server's workers over a torch.distributed group.

Imported by both sides: by the trainer (videor1.rollout.vllm, our torch) and by vLLM's workers
(videor1_vllm_server.WeightLoader, vLLM's torch), so it needs torch and the standard library only.

The group is stateless (no torch.distributed.init_process_group: the trainer's own default group
and vLLM's stay untouched): a TCPStore that the trainer's server owner hosts, a PrefixStore, and
one backend object, ProcessGroupNCCL on GPUs or ProcessGroupGloo on the CPU. Rank 0 is the
trainer, ranks 1..N are vLLM's N workers (tensor parallel). A sync is one broadcast per tensor from
rank 0, in the order of a spec list [(name, dtype, shape), ...] that both sides hold before the first
tensor moves, so the workers can allocate each buffer and hand it to vLLM's in-place reload as it
arrives (one tensor in flight, never the whole model twice).

The two torch builds need not match: the TCPStore and gloo wire formats are stable across
versions (tested: torch 2.14.1 against vLLM's 2.13.0); NCCL needs both libraries to speak the
same protocol, which no GPU run has checked yet (benchmarks/gpu_check.py has no vLLM step: vLLM
cannot be installed on the borrowed GPU machine), so "auto" falls back to shared memory when the
NCCL group cannot form.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
PREFIX = "videor1_weights"


class WeightGroup:
    """One rank's end of the transfer group. host/port: the TCPStore (hosted by rank 0)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                 device: torch.device | str = "cpu"):
        if backend not in BACKENDS:
            raise ValueError(f"weight transfer backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device)
        # wait_for_workers=False: rank 0 returns at once; the group's constructor is the rendezvous.
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                                   wait_for_workers=False)
        prefix = dist.PrefixStore(PREFIX, self.store)
        if backend == "gloo":
            from torch.distributed.distributed_c10d import ProcessGroupGloo

            self.pg = ProcessGroupGloo(prefix, rank, world_size, timeout)
        else:
            from torch.distributed.distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast `tensor` (contiguous, on self.device) from rank 0 in place; returns it."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def receive(self, specs: list) -> "iter[tuple[str, torch.Tensor]]":
        """Ranks >= 1: yield (name, tensor) for each (name, dtype name, shape) of `specs`, in order."""
        for name, dtype, shape in specs:
            buf = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.device)
            yield name, self.broadcast(buf)

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 - older builds have no shutdown; the process exit frees it
            pass


PROBE = 0x5EED  # the probe tensor [world_size, PROBE] that rank 0 sends once the group is up


def spec(name: str, dtype: torch.dtype, shape) -> list:
    """[name, dtype name, shape], as JSON carries a tensor's description."""
    return [name, str(dtype).removeprefix("torch."), list(shape)]


def probe(group: WeightGroup) -> None:
    """Check the new group end to end: rank 0 sends [world_size, PROBE], the others verify it."""
    t = torch.tensor([group.world_size, PROBE], dtype=torch.int64, device=group.device)
    if group.rank:
        t.zero_()
    got = group.broadcast(t).tolist()
    if got != [group.world_size, PROBE]:
        raise RuntimeError(f"weight transfer probe: got {got}, expected {[group.world_size, PROBE]}")
