"""What every training entry point (train.py, sft.py) sets up the same way: config checks, the
prompt stream with counted skips, the engines, resume, and the final HF save."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import torch

from videor1 import distributed as D
from videor1.checkpoint import (STATE_FILE, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from videor1.config import Config, ConfigError, config_changes, config_hash, to_dict
from videor1.engine import build_engine, hf_deepspeed_context, load_deepspeed_config
from videor1.model import load_model, load_processor
from videor1.policy import PolicyModule
from videor1.rollout import Media, Prompt, build_prompt, load_media
from videor1.sampler import PromptSampler
from videor1.vision import MediaDecodeError

log = logging.getLogger("videor1")


# What a run writes into its output_dir. An output_dir holding any of these holds an earlier run: a
# fresh run refuses it, --overwrite_output_dir removes these (and nothing else: e.g. a log file the
# launcher writes there, as the demo does, neither counts nor is removed).
RUN_OUTPUTS = ("checkpoint-*", "final", "final.tmp", "metrics.jsonl", "completions.jsonl", "tensorboard", "wandb",
               "config.yaml", "reward_curves.png", "sft_curves.png")


def _main_process() -> bool:  # before init_distributed: torchrun's RANK
    return os.environ.get("RANK", "0") == "0"


def resume_path(cfg: Config) -> str:
    """The checkpoint this run resumes from: train.resume_from, or with "auto" the latest complete
    checkpoint in output_dir; "" for a fresh run."""
    if cfg.train.resume_from == "auto":
        return latest_checkpoint(cfg.train.output_dir) or ""
    return cfg.train.resume_from


def earlier_outputs(output_dir: str) -> list[str]:
    """Paths in output_dir that an earlier run wrote (RUN_OUTPUTS), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted({p for pattern in RUN_OUTPUTS for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))})


def check_output_dir(cfg: Config) -> None:
    """The run directory rules (filesystem only, so every rank decides the same; before any model loads):
    a fresh run into an output_dir that holds an earlier run's outputs (RUN_OUTPUTS) refuses unless
    train.overwrite_output_dir, which removes them; output_dir must be writable. overwrite_output_dir
    with resume_from 'auto' resumes the latest complete checkpoint when there is one and otherwise
    starts fresh over the earlier outputs (a rerunnable script's "continue or restart")."""
    out, t = cfg.train.output_dir, cfg.train
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"train.output_dir is not a directory: {out!r}")
    path = resume_path(cfg)
    inside = bool(path) and os.path.abspath(path).startswith(os.path.abspath(out) + os.sep)
    if t.overwrite_output_dir and inside and t.resume_from != "auto":
        raise ConfigError(f"train.overwrite_output_dir would remove train.resume_from {t.resume_from!r} (it lies in "
                          f"train.output_dir {out!r})")
    earlier = earlier_outputs(out)
    # Resuming a checkpoint of this output_dir continues its run; a fresh run, or a resume from a
    # checkpoint elsewhere, would mix its history with the earlier run's.
    if earlier and not inside:
        if not t.overwrite_output_dir:
            names = [os.path.basename(p) for p in earlier]
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            hint = (" (train.resume_from 'auto' found no complete checkpoint there)" if t.resume_from == "auto" else
                    f" (and train.resume_from {path!r} lies outside it)" if path else "")
            raise ConfigError(f"train.output_dir {out!r} is not empty ({shown}){hint}: a fresh run would mix with or "
                              "destroy an earlier run. Resume it (train.resume_from auto / --resume_from_checkpoint), "
                              "pick another train.output_dir, or pass --train.overwrite_output_dir true "
                              "(--overwrite_output_dir true) to remove its checkpoints, metrics and final model")
        # Rank 0 alone removes (every rank has decided the same above). The others cannot get ahead of
        # it: they next meet it in init_distributed's rendezvous, which rank 0 joins only after this.
        if _main_process():
            for p in earlier:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.remove(p)
            log.warning("train.overwrite_output_dir: removed %s from %s", ", ".join(os.path.basename(p) for p in earlier),
                        out)
    check_writable(out)


def check_writable(path: str) -> None:
    """Create `path` and write + remove a probe file in it; ConfigError naming the directory otherwise."""
    probe = os.path.join(path, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"train.output_dir {path!r} is not writable: {e.strerror or e}") from None


def read_trainer_state(path: str) -> dict:
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ConfigError(f"train.resume_from {path!r} is not a complete checkpoint (no {STATE_FILE})")
    try:
        with open(state_file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{state_file} is not valid JSON ({e}): the checkpoint is damaged") from None


def check_resume_config(cfg: Config, path: str, state: dict | None = None) -> None:
    """Refuse to resume from a checkpoint whose seed or training-shaping config differs from this one
    (names each differing dotted key, old -> new), except keys listed in train.resume_allow_changes."""
    state = read_trainer_state(path) if state is None else state
    if "config" not in state:  # written before checkpoints recorded their config
        if _main_process():
            log.warning("checkpoint %s records no config: cannot check that it matches this run", path)
        return
    new = to_dict(cfg)
    if state.get("config_hash") == config_hash(new) and state.get("seed", cfg.train.seed) == cfg.train.seed:
        return
    changes = config_changes(state["config"], new)
    allowed = set(cfg.train.resume_allow_changes)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {cur!r}" for k, (old, cur) in refused.items())
        raise ConfigError(f"cannot resume from {path}: its config differs in {listed}. Restore those values, or "
                          f"list the keys in train.resume_allow_changes to change them deliberately "
                          f"(e.g. --train.resume_allow_changes '[{', '.join(refused)}]')")
    if changes and _main_process():
        log.warning("resuming from %s with deliberate changes (train.resume_allow_changes): %s", path,
                    "; ".join(f"{k}: {old!r} -> {cur!r}" for k, (old, cur) in changes.items()))


def check_paths(cfg: Config) -> None:
    """Files the run needs exist, the run directory rules hold and a resumed checkpoint matches this
    config; raised before any model loads."""
    if not os.path.isfile(cfg.data.train_file):
        raise ConfigError(f"data.train_file not found: {cfg.data.train_file!r}")
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path is not a checkpoint directory (no config.json): {cfg.model.path!r}")
    if cfg.train.engine == "deepspeed" and not os.path.isfile(cfg.train.deepspeed_config):
        raise ConfigError(f"train.deepspeed_config not found: {cfg.train.deepspeed_config!r}")
    if cfg.train.engine == "deepspeed":
        load_deepspeed_config(cfg, 1)  # a malformed JSON fails here, naming the file and the position
    if cfg.train.resume_from not in ("", "auto") and not os.path.isdir(cfg.train.resume_from):
        raise ConfigError(f"train.resume_from not found: {cfg.train.resume_from!r}")
    check_output_dir(cfg)
    path = resume_path(cfg)
    if path:
        check_resume_config(cfg, path)


def special_ids(tokenizer) -> tuple[list[int], int]:
    """(EOS ids: <|im_end|> and <|endoftext|>, pad id)."""
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos_ids = sorted(eos - {None, tokenizer.unk_token_id})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return eos_ids, pad_id


class PromptStream:
    """Rows for this rank, ready as Prompts; undecodable media are skipped (logged with the path,
    counted), never substituted; prompts longer than data.max_prompt_length tokens (vision included)
    are skipped whole (logged, counted in `too_long`, outside the skip rate), never truncated. The
    run stops with a clear error once more than data.max_skip_rate
    of the samples (after data.skip_rate_min_samples) failed. Decoded media can be cached in memory."""

    def __init__(self, cfg: Config, rows: list[dict], processor, sampler: PromptSampler, generator: torch.Generator,
                 shuffled: bool):
        self.cfg, self.rows, self.processor, self.sampler, self.generator = cfg, rows, processor, sampler, generator
        self.shuffled = shuffled
        self.data_root = cfg.data.data_root or os.path.dirname(os.path.abspath(cfg.data.train_file))
        self.attempted = self.skipped = 0
        self.too_long = 0  # prompts over data.max_prompt_length (not decode failures: not in the skip rate)
        self.rollout_failed = 0  # prompts whose rollouts failed (train.py counts them; kept across resumes)
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
        prompt = build_prompt(row, media, self.processor, self.cfg.data, shuffled=self.shuffled, generator=self.generator)
        limit = self.cfg.data.max_prompt_length
        if limit and prompt.input_ids.numel() > limit:  # skipped whole, never truncated (vision tokens included)
            self.too_long += 1
            log.warning("skipping problem %s: prompt of %d tokens (vision included) > data.max_prompt_length=%d",
                        row["problem_id"], prompt.input_ids.numel(), limit)
            if self.too_long >= self.cfg.data.skip_rate_min_samples and self.too_long == self.attempted - self.skipped:
                raise RuntimeError(f"all {self.too_long} prompts loaded so far are longer than data.max_prompt_length="
                                   f"{limit} tokens (vision included): raise it or lower the pixel / frame limits")
            return None
        return prompt

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
                "attempted": self.attempted, "skipped": self.skipped, "too_long": self.too_long,
                "rollout_failed": self.rollout_failed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.pending = list(state["pending"])
        self.attempted, self.skipped = int(state["attempted"]), int(state["skipped"])
        self.too_long = int(state.get("too_long", 0))  # checkpoints written before the counter existed
        self.rollout_failed = int(state.get("rollout_failed", 0))


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
    path = resume_path(cfg)  # check_paths has already compared its config with this run's
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


def checkpoint(cfg: Config, step: int, engine, stateful: dict, generators: dict[str, torch.Generator],
               hf_writer=None) -> str:
    """Atomic checkpoint of everything resume needs (collective); `stateful` as for resume. It records
    the seed, the hash of the config that shapes training and the full config (resume compares them).
    `hf_writer(tmp_dir)`, when given, is called on every rank (collectively) before the atomic rename.
    Older checkpoints beyond train.save_total_limit are deleted once the new one is complete."""
    trainer_state = {"seed": cfg.train.seed, "config_hash": config_hash(cfg), "config": to_dict(cfg)}
    return save_checkpoint(cfg.train.output_dir, step, engine, trainer_state,
                           {**{name: obj.state_dict() for name, obj in stateful.items()}, "rng": rng_state(generators)},
                           extra_writer=hf_writer, save_total_limit=cfg.train.save_total_limit)


def write_run_config(cfg: Config) -> None:
    if D.is_main():
        import yaml

        os.makedirs(cfg.train.output_dir, exist_ok=True)
        with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


HF_SUBDIR = "hf"  # checkpoint-N/hf: the HF-format copy of the model (train.save_hf_checkpoints)


def write_hf(engine, processor, out_dir: str) -> None:
    """The model in HF format (from_pretrained loads it) plus the processor files, written into
    out_dir by rank 0. Collective: every rank gathers the full state dict. No rename, no barrier:
    the callers (save_final, checkpoints) make it atomic."""
    state_dict = engine.full_state_dict()
    if D.is_main():
        engine.module.hf.save_pretrained(out_dir, state_dict=state_dict)
        processor.save_pretrained(out_dir)


def hf_writer(engine, processor):
    """The checkpoint hook (checkpoint(..., hf_writer=...)): an HF copy in <checkpoint tmp dir>/hf."""
    return lambda tmp_dir: write_hf(engine, processor, os.path.join(tmp_dir, HF_SUBDIR))


def save_final(engine, processor, out_dir: str) -> None:
    """The trained model in HF format (from_pretrained loads it), written atomically (collective)."""
    tmp = out_dir + ".tmp"
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    write_hf(engine, processor, tmp)
    if D.is_main():
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    D.barrier()


def progress_bar(total: int, initial: int, desc: str):
    if not D.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
