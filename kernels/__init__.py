"""Fused GRPO loss kernels (Triton); standalone: depends on torch and triton only."""
