"""A second device on a CPU-only machine, and a small model that lives on it.

torch's lazy tensor backend (device "lazy") computes real values, forward and backward, and raises
when a lazy tensor meets a CPU tensor, which is what a CUDA model does with CPU inputs. transformers'
Qwen2.5-VL vision tower trips on it, so the trainer's glue code is exercised with StandInVL: the
interface our code uses of a Qwen2.5-VL (`.model(...)` -> last_hidden_state, `.lm_head`, `.config`
ids, `.generate(...)` returning ids on the model's device) with a few real layers that read the
text ids and the patches.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
from torch import nn

from videor1.engine import StepResult


def lazy_device() -> torch.device:
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy")


class StandInTrunk(nn.Module):
    """Embedding + patch projection + one mixing layer: hidden [B, T, H]. Every input is used, so an
    input on the wrong device raises as it would in the real model."""

    def __init__(self, vocab: int, hidden: int, patch_dim: int = 1176):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.patch = nn.Linear(patch_dim, hidden)
        self.mix = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
                pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                use_cache=False, return_dict=True, position_ids=None):
        h = self.embed(input_ids)
        pixels = pixel_values_videos if pixel_values_videos is not None else pixel_values
        if pixels is not None:  # one vision summary, added where the vision placeholders are
            vis = self.patch(pixels.to(self.patch.weight.dtype)).mean(0)
            h = h + (mm_token_type_ids > 0).to(h.dtype)[..., None] * vis
        if attention_mask is not None:
            h = h * attention_mask.to(h.dtype)[..., None]
        h = h + torch.tanh(self.mix(torch.cumsum(h, dim=1) / math.sqrt(h.shape[1])))
        if second_per_grid_ts is not None:
            h = h + 0.0 * second_per_grid_ts.sum()
        return types.SimpleNamespace(last_hidden_state=h)


class StandInVL(nn.Module):
    """The part of a Qwen2.5-VL `*ForConditionalGeneration` that videor1 calls."""

    def __init__(self, tokenizer, hidden: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vocab = len(tokenizer)
            self.model = StandInTrunk(vocab, hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
        ids = tokenizer.convert_tokens_to_ids
        self.config = types.SimpleNamespace(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"))
        self.generation_configs: list = []  # what each generate call was given

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, generation_config, synced_gpus=False, **model_inputs):
        """Sampled (or greedy) continuation without a cache: [B * n, P + new] on the model's device."""
        from videor1.policy import with_mm_token_types

        self.generation_configs.append(generation_config)
        g = generation_config
        n = g.num_return_sequences or 1
        ids, attn = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        vision = {k: v for k, v in model_inputs.items() if k != "mm_token_type_ids"}
        for _ in range(g.max_new_tokens):
            inputs = with_mm_token_types({"input_ids": ids, "attention_mask": attn, **vision}, self.config)
            logits = self.lm_head(self.model(**inputs).last_hidden_state[:, -1]).float()
            if g.suppress_tokens:
                logits[:, g.suppress_tokens] = float("-inf")
            nxt = (torch.multinomial(torch.softmax(logits / g.temperature, -1), 1) if g.do_sample
                   else logits.argmax(-1, keepdim=True))
            ids, attn = torch.cat([ids, nxt], 1), torch.cat([attn, torch.ones_like(nxt)], 1)
        return ids


class _MovesInputs:
    """What FSDP2's root pre-forward does: every tensor argument is moved to the module's device."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device

    def _move(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        if isinstance(x, dict):
            return {k: self._move(v) for k, v in x.items()}
        return x

    def __call__(self, *args, **kwargs):
        return self.module(*[self._move(a) for a in args], **{k: self._move(v) for k, v in kwargs.items()})

    def generate(self, **kwargs):
        return self.module.generate(**{k: self._move(v) for k, v in kwargs.items()})

    # the engines yield the nn.Module itself: the trainer switches it to eval mode to sample
    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


class StandInEngine:
    """videor1.engine's interface around a module on `device`, in one of two behaviours:
    "fsdp2" moves the inputs of forward and generate to the device (FSDP2's root pre-forward does);
    "deepspeed" leaves them where they are (full_weights() yields the bare module, as ZeRO-3's does)."""

    def __init__(self, module: nn.Module, device: torch.device, kind: str, lr: float = 0.1, trainable: bool = True):
        self.module, self.device, self.kind = module.to(device), device, kind
        self._call = _MovesInputs(self.module, device) if kind == "fsdp2" else self.module
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr) if trainable else None
        self.lr = lr

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    @contextlib.contextmanager
    def full_weights(self):
        yield self._call

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> StepResult:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, 5.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, math.isfinite(norm), self.lr)
