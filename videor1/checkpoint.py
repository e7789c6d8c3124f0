"""Atomic checkpoints: everything is written into `<dir>.tmp`, then renamed to `<dir>` by rank 0.

A checkpoint directory holds the engine's sharded model + optimiser + scheduler, trainer_state.json
(step, per-rank data position, counters) and rng_rank{r}.pt (every RNG state of each rank). A crash
at any point leaves either the previous checkpoints or the complete new one, never a partial one.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from videor1 import distributed as D

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in (extra_generators or {}).items():
        state[f"gen/{name}"] = gen.get_state()
    return state


def set_rng_state(state: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (extra_generators or {}).items():
        gen.set_state(state[f"gen/{name}"])


def save_checkpoint(output_dir: str, step: int, engine, trainer_state: dict, rank_state: dict,
                    extra_writer=None, save_total_limit: int = 0) -> str:
    """Collective: every rank calls it. `rank_state` (this rank's sampler, RNGs) is gathered to rank 0's
    trainer_state.json except the RNG states, which each rank writes to its own file. `extra_writer(tmp)`,
    when given, is called on every rank (it may be collective) after the engine state is written and
    before the atomic rename (e.g. an HF-format copy of the model). `save_total_limit` > 0: once the new
    checkpoint is complete, rank 0 deletes the oldest complete checkpoints beyond the last N."""
    final = checkpoint_dir(output_dir, step)
    tmp = final + ".tmp"
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    D.barrier()
    engine.save(tmp)
    torch.save(rank_state.pop("rng"), os.path.join(tmp, f"rng_rank{D.rank()}.pt"))
    if extra_writer is not None:
        extra_writer(tmp)
    ranks = D.all_gather_objects(rank_state)
    D.barrier()
    if D.is_main():
        state = dict(trainer_state, step=step, world_size=D.world_size(), ranks=ranks)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # a stale copy of the same step (e.g. a rerun): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit > 0:
            prune_checkpoints(output_dir, save_total_limit)
    D.barrier()
    return final


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in output_dir, oldest first (ignores *.tmp leftovers)."""
    out = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def prune_checkpoints(output_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (rank 0 only, after a new one is complete);
    final/ and incomplete *.tmp directories are never touched. Returns the deleted paths."""
    done = complete_checkpoints(output_dir)
    deleted = []
    for _, path in done[:max(0, len(done) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in output_dir (ignores *.tmp leftovers)."""
    done = complete_checkpoints(output_dir)
    return done[-1][1] if done else None


def load_checkpoint(path: str, engine) -> tuple[dict, dict]:
    """Restore the engine; returns (trainer_state, this rank's state with its "rng")."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"not a complete checkpoint (no {STATE_FILE}): {path}")
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    if state["world_size"] != D.world_size():
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} ranks; this job has "
                         f"{D.world_size()} (exact resume needs the same world size)")
    engine.load(path)
    rank_state = dict(state["ranks"][D.rank()])
    rank_state["rng"] = torch.load(os.path.join(path, f"rng_rank{D.rank()}.pt"), weights_only=False)
    return state, rank_state
