"""videor1: T-GRPO training of Qwen2.5-VL for video reasoning."""

__version__ = "0.1.0"
