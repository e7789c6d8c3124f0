"""What every training entry point (train.py, sft.py) sets up the same way: config checks, the
prompt stream with counted skips, the engines, resume, and the final HF save."""

from __future__ import annotations

import logging
import os
import shutil

import torch

from videor1 import distributed as D
from videor1.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from videor1.config import Config, ConfigError, to_dict
from videor1.engine import build_engine, hf_deepspeed_context, load_deepspeed_config
from videor1.model import load_model, load_processor
from videor1.policy import PolicyModule
from videor1.rollout import Media, Prompt, build_prompt, load_media
from videor1.sampler import PromptSampler
from videor1.vision import MediaDecodeError

log = logging.getLogger("videor1")


def check_paths(cfg: Config) -> None:
    """Files the run needs exist; raised before any model loads."""
    if not os.path.isfile(cfg.data.train_file):
        raise ConfigError(f"data.train_file not found: {cfg.data.train_file!r}")
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path is not a checkpoint directory (no config.json): {cfg.model.path!r}")
    if cfg.train.engine == "deepspeed" and not os.path.isfile(cfg.train.deepspeed_config):
        raise ConfigError(f"train.deepspeed_config not found: {cfg.train.deepspeed_config!r}")
    if cfg.train.resume_from not in ("", "auto") and not os.path.isdir(cfg.train.resume_from):
        raise ConfigError(f"train.resume_from not found: {cfg.train.resume_from!r}")


def special_ids(tokenizer) -> tuple[list[int], int]:
    """(EOS ids: <|im_end|> and <|endoftext|>, pad id)."""
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos_ids = sorted(eos - {None, tokenizer.unk_token_id})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return eos_ids, pad_id


class PromptStream:
    """Rows for this rank, ready as Prompts; undecodable media are skipped (logged with the path,
    counted), never substituted. The run stops with a clear error once more than data.max_skip_rate
    of the samples (after data.skip_rate_min_samples) failed. Decoded media can be cached in memory."""

    def __init__(self, cfg: Config, rows: list[dict], processor, sampler: PromptSampler, generator: torch.Generator,
                 shuffled: bool):
        self.cfg, self.rows, self.processor, self.sampler, self.generator = cfg, rows, processor, sampler, generator
        self.shuffled = shuffled
        self.data_root = cfg.data.data_root or os.path.dirname(os.path.abspath(cfg.data.train_file))
        self.attempted = self.skipped = 0
        self.pending: list[int] = []  # rows drawn but held back for a batch of their data_type
        self.cache: dict[int, Media] = {}

    def _media(self, index: int, row: dict) -> Media:
        if index in self.cache:
            return self.cache[index]
        media = load_media(row, self.cfg.data, self.data_root)
        if self.cfg.data.cache_media:
            self.cache[index] = media
        return media

    def _prepare(self, index: int) -> Prompt | None:
        row = self.rows[index]
        self.attempted += 1
        try:
            media = self._media(index, row)
        except (MediaDecodeError, FileNotFoundError) as e:
            self.skipped += 1
            log.warning("skipping problem %s: %s", row["problem_id"], e)
            self.check_rate(self.skipped, self.attempted)
            return None
        return build_prompt(row, media, self.processor, self.cfg.data, shuffled=self.shuffled, generator=self.generator)

    def take(self, n: int, homogeneous: bool = False) -> list[Prompt]:
        """The next n loadable prompts. homogeneous=True keeps to one data_type (rows of the other type
        wait in `pending` for a later batch): a batch of images and videos would run the vision tower
        twice, and ranks running it a different number of times desynchronise FSDP/ZeRO-3 gathers."""
        out: list[Prompt] = []
        kind = None
        waiting, self.pending = self.pending, []
        for index in waiting:
            if len(out) < n and (not homogeneous or kind in (None, self.rows[index]["data_type"])):
                prompt = self._prepare(index)
                if prompt is not None:
                    out.append(prompt)
                    kind = prompt.row["data_type"]
            else:
                self.pending.append(index)
        while len(out) < n:
            index = self.sampler.next()
            if homogeneous and kind is not None and self.rows[index]["data_type"] != kind:
                self.pending.append(index)
                continue
            prompt = self._prepare(index)
            if prompt is not None:
                out.append(prompt)
                kind = prompt.row["data_type"]
        return out

    def check_rate(self, skipped: int, attempted: int) -> None:
        limit = self.cfg.data.max_skip_rate
        if attempted >= self.cfg.data.skip_rate_min_samples and skipped > limit * attempted:
            raise RuntimeError(f"{skipped} of {attempted} samples could not be loaded ({skipped / attempted:.1%}), "
                               f"over data.max_skip_rate={limit:.1%}: check data.data_root and the media files")

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "pending": list(self.pending),
                "attempted": self.attempted, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.pending = list(state["pending"])
        self.attempted, self.skipped = int(state["attempted"]), int(state["skipped"])


def build_models(cfg: Config, optimizer_steps: int, micro_batches_per_step: int, with_reference: bool):
    """(processor, policy engine, reference engine or None), sharded by the configured engine; the
    learning-rate schedule spans `optimizer_steps`."""
    processor = load_processor(cfg.model.path)
    ds_config = load_deepspeed_config(cfg, micro_batches_per_step) if cfg.train.engine == "deepspeed" else None
    stage3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    keep = hf_deepspeed_context(ds_config) if stage3 else None  # partitioned loading while alive

    def wrapped(trainable: bool):
        # The frozen reference needs no fp32 master copy: under bf16 it is held in bf16 (half the memory).
        dtype = "bfloat16" if not trainable and cfg.train.mixed_precision == "bf16" else cfg.model.dtype
        hf = load_model(cfg.model.path, dtype, cfg.model.attn_implementation)
        module = PolicyModule(hf, kernel_backend=cfg.algo.kernel_backend, temperature=cfg.rollout.temperature)
        if not trainable:
            module.requires_grad_(False)
        return build_engine(cfg, module, optimizer_steps, micro_batches_per_step, trainable=trainable,
                            ds_config=ds_config)

    policy = wrapped(trainable=True)
    reference = wrapped(trainable=False) if with_reference else None
    del keep
    return processor, policy, reference


def resume(cfg: Config, engine, stateful: dict, generators: dict[str, torch.Generator]) -> int:
    """Restore engine, RNGs and every object in `stateful` (name -> object with state_dict /
    load_state_dict: the prompt stream's data position, counters) from train.resume_from ("auto" =
    the latest complete checkpoint in output_dir); returns the step to start from (0 when fresh)."""
    path = latest_checkpoint(cfg.train.output_dir) if cfg.train.resume_from == "auto" else cfg.train.resume_from
    if not path:
        return 0
    state, mine = load_checkpoint(path, engine)
    for name, obj in stateful.items():
        if name not in mine:
            raise ValueError(f"checkpoint {path} holds no '{name}' state (it has {sorted(mine)}): written by another "
                             "entry point or version")
        obj.load_state_dict(mine[name])
    set_rng_state(mine["rng"], generators)
    if D.is_main():
        log.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def checkpoint(cfg: Config, step: int, engine, stateful: dict, generators: dict[str, torch.Generator]) -> str:
    """Atomic checkpoint of everything resume needs (collective); `stateful` as for resume."""
    return save_checkpoint(cfg.train.output_dir, step, engine, {},
                           {**{name: obj.state_dict() for name, obj in stateful.items()}, "rng": rng_state(generators)})


def write_run_config(cfg: Config) -> None:
    if D.is_main():
        import yaml

        os.makedirs(cfg.train.output_dir, exist_ok=True)
        with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def save_final(engine, processor, out_dir: str) -> None:
    """The trained model in HF format (from_pretrained loads it), written atomically (collective)."""
    state_dict = engine.full_state_dict()
    if D.is_main():
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.hf.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    D.barrier()


def progress_bar(total: int, initial: int, desc: str):
    if not D.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
