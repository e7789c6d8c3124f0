"""CoT SFT, Video-R1's first stage: train on the row's reasoning and answer.

    torchrun --nproc_per_node=8 videor1/sft.py --config configs/qwen25vl_7b_sft_8gpu.yaml
    torchrun --nproc_per_node=2 videor1/sft.py --config configs/tiny_sft_cpu.yaml

The prompt is the trainer's (same template, same patches); the assistant turn is
`process + "\\n" + solution` then <|im_end|>. The loss covers the assistant tokens only by default;
`sft.loss_on: video_r1` masks exactly what Video-R1's sft_video.py masks for Qwen2.5-VL (padding and
<|image_pad|>; every other token, <|video_pad|> included, is trained on); `all_but_vision` also masks
<|video_pad|>. Same engines, config, checkpoints and resume as train.py; the output
(`<output_dir>/final`) is an HF checkpoint that train.py starts from.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: don't let videor1/*.py shadow top-level packages
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import logging
import math
import time

import torch

from videor1 import distributed as D
from videor1 import session
from videor1.config import Config, parse_cli, to_dict
from videor1.data import load_rows
from videor1.metrics import (MetricsLogger, StepTimer, check_report_to, peak_memory_gb, plot_curves, read_metrics,
                             summary_table)
from videor1.prompts import build_sft_target
from videor1.rollout import Prompt
from videor1.sampler import PromptSampler

log = logging.getLogger("videor1.sft")


# Tokens that sft.loss_on's whole-sequence modes take out of the loss, besides padding.
# video_r1: sft_video.py's collate_fn masks pad_token_id, then `[151652, 151653, 151656] if
# isinstance(processor, Qwen2VLProcessor) else [processor.image_token]`; Qwen2_5_VLProcessor is not a
# Qwen2VLProcessor (it derives from ProcessorMixin), so for Qwen2.5-VL only <|image_pad|> is masked and
# a video's <|video_pad|> placeholders, <|vision_start|> and <|vision_end|> stay labelled.
SFT_MASKED_TOKENS = {
    "video_r1": ("<|image_pad|>",),
    "all_but_vision": ("<|image_pad|>", "<|video_pad|>"),
}


def sft_example(prompt: Prompt, tokenizer, loss_on: str) -> dict:
    """One training sequence: input_ids [T] = prompt + target (+ <|im_end|>), label_mask [T]."""
    target = build_sft_target(prompt.row) + "<|im_end|>"
    target_ids = tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([prompt.input_ids, target_ids])
    if loss_on == "assistant":
        label = torch.cat([torch.zeros_like(prompt.input_ids), torch.ones_like(target_ids)])
    elif loss_on in SFT_MASKED_TOKENS:  # every token but these (padding is masked at collation)
        masked = [tokenizer.convert_tokens_to_ids(t) for t in SFT_MASKED_TOKENS[loss_on]]
        label = (~torch.isin(ids, torch.tensor(masked))).long()
    else:
        raise ValueError(f"sft.loss_on must be 'assistant', 'video_r1' or 'all_but_vision', got {loss_on!r}")
    return {"input_ids": ids, "label_mask": label, "vision": prompt.vision}


def collate(examples: list[dict], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Right-padded batch: model kwargs (input_ids, attention_mask, the samples' vision tensors
    concatenated in order) and label_mask [B, T] (0 on padding)."""
    length = max(e["input_ids"].numel() for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = e["input_ids"].numel()
        ids[i, :n], attn[i, :n], labels[i, :n] = e["input_ids"], 1, e["label_mask"]
    inputs = {"input_ids": ids, "attention_mask": attn}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [e["vision"][key] for e in examples if key in e["vision"]]
        if parts:
            inputs[key] = torch.cat(parts)
    return inputs, labels


def to_device(inputs: dict, labels: torch.Tensor, device: torch.device) -> tuple[dict, torch.Tensor]:
    """A collated batch moved to the model's device: its one host-to-device crossing."""
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def sft_micro_step(model, prompts: list[Prompt], tokenizer, loss_on: str, pad_id: int, micro_batches: int,
                   timer: StepTimer) -> tuple[float, int]:
    """Forward + backward (of loss / micro_batches) of one micro-batch on the engine's device;
    returns (loss, tokens) on the CPU."""
    with timer("data"):
        examples = [sft_example(p, tokenizer, loss_on) for p in prompts]
        inputs, labels = to_device(*collate(examples, pad_id), model.device)
    with timer("forward_backward"):
        loss, _ = model(inputs, mode="sft", label_mask=labels)
        model.backward(loss / micro_batches)
    return float(loss.detach()), int(inputs["attention_mask"].sum())


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: Config = parse_cli(sys.argv[1:] if argv is None else argv)
    session.check_paths(cfg)
    check_report_to(cfg.train.report_to)
    rows = load_rows(cfg.data.train_file)

    D.init_distributed(cfg.train.dist_timeout_s)
    rank, world, main_rank = D.rank(), D.world_size(), D.is_main()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    sampler = PromptSampler(len(rows), cfg.train.seed, rank, world, cfg.data.shuffle)
    micro, batch = cfg.optim.grad_accum, cfg.train.per_device_batch_size
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(
        1, math.ceil(cfg.train.num_epochs * sampler.rows_per_epoch / (micro * batch)))

    processor, model, _ = session.build_models(cfg, total_steps, micro, with_reference=False)
    tok = processor.tokenizer
    _, pad_id = session.special_ids(tok)
    generators: dict[str, torch.Generator] = {}
    stream = session.PromptStream(cfg, rows, processor, sampler, torch.Generator(), shuffled=False)
    stateful = {"stream": stream}
    start_step = session.resume(cfg, model, stateful, generators)
    logger = MetricsLogger(cfg.train.output_dir, cfg.train.report_to, main_rank, resume_step=start_step,
                           run_config=to_dict(cfg))
    session.write_run_config(cfg)
    if main_rank:
        log.info("CoT SFT: %d steps, %d ranks x %d x %d samples/step, loss on %s, engine=%s, device=%s", total_steps,
                 world, micro, batch, cfg.sft.loss_on, cfg.train.engine, model.device)
    progress = session.progress_bar(total_steps, start_step, "SFT")

    for step in range(start_step, total_steps):
        timer = StepTimer()
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for _ in range(micro):
            with timer("data"):
                prompts = stream.take(batch, homogeneous=True)
            loss, n = sft_micro_step(model, prompts, tok, cfg.sft.loss_on, pad_id, micro, timer)
            loss_sum += loss / micro
            tokens += n
        with timer("optimizer"):
            result = model.step()
        step_time = time.perf_counter() - t0
        sums = D.all_reduce_sum([loss_sum, tokens, stream.attempted, stream.skipped, stream.too_long])
        record = {"step": step + 1, "loss": float(sums[0]) / world, "grad_norm": result.grad_norm, "lr": result.lr,
                  "step_skipped": not result.applied, "samples_skipped": int(sums[3]),
                  "samples_too_long": int(sums[4]),
                  **{f"time/{k}": v for k, v in timer.times.items()}, "time/step": step_time,
                  "tokens_per_s": float(sums[1]) / step_time, "peak_mem_gb": float(D.all_reduce_max([peak_memory_gb()])[0])}
        if not result.applied and main_rank:
            log.warning("step %d: non-finite gradient (norm %s); update skipped", step + 1, result.grad_norm)
        stream.check_rate(int(sums[3]), int(sums[2]))
        logger.log(record)
        if main_rank and ((step + 1) % cfg.train.logging_steps == 0 or step + 1 == total_steps):
            log.info("step %d/%d: loss %.5f grad_norm %.4g step %.2fs", step + 1, total_steps, record["loss"],
                     result.grad_norm, step_time)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0 and step + 1 < total_steps:
            session.checkpoint(cfg, step + 1, model, stateful, generators,
                               hf_writer=session.hf_writer(model, processor) if cfg.train.save_hf_checkpoints else None)

    final_dir = os.path.join(cfg.train.output_dir, "final")
    session.save_final(model, processor, final_dir)
    if main_rank:
        progress.close()
        records = read_metrics(logger.path)
        print("\n" + summary_table(records, ["loss", "grad_norm", "lr", "time/step", "tokens_per_s"]))
        plot_curves(records, ["loss", "grad_norm", "lr"], os.path.join(cfg.train.output_dir, "sft_curves.png"), "CoT SFT")
        print(f"final model: {final_dir}")
    logger.close()
    D.cleanup()
    return final_dir


if __name__ == "__main__":
    main()
