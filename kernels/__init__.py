"""Triton kernels, each with its plain-torch twin (the CPU path and the tests' reference): decode
attention over a paged KV cache (LeanAttention, stream-K), RMSNorm fused with the residual add, rotary
embedding fused with the KV-cache write, SiLU-and-multiply, the skinny matrix product of decode batches
(which can also take RoPE + cache write, SiLU, or the residual add and an RMSNorm into its epilogues),
the row-wise argmax of the logits and the staging of a decode graph's inputs (`kernels.decode_inputs`).
`kernels.launch` says how they are launched (interpreted on CPU; programmatic dependent launch on
Hopper).

Note: a PyPI distribution named `kernels` (Hugging Face's kernel hub) exists and transformers probes
for it by import name. Ours is found under the `leanserve` distribution (version 0.x, outside the
0.18-0.19 window transformers accepts) or without metadata (editable), so it is never taken for it;
tests/test_foundation.py guards this."""

from kernels.activation import reference_silu_and_mul, silu_and_mul
from kernels.argmax import argmax_rows, reference_argmax_rows
from kernels.lean_attention import lean_attention_decode
from kernels.reference import reference_decode_attention
from kernels.rms_norm import fused_add_rms_norm, reference_fused_add_rms_norm, reference_rms_norm, rms_norm
from kernels.rotary import reference_rope_and_cache, rope_and_cache
from kernels.skinny_fused import skinny_linear_rope
from kernels.skinny_linear import reference_skinny_linear, skinny_linear

__all__ = [
    "argmax_rows",
    "fused_add_rms_norm",
    "lean_attention_decode",
    "reference_argmax_rows",
    "reference_decode_attention",
    "reference_fused_add_rms_norm",
    "reference_rms_norm",
    "reference_rope_and_cache",
    "reference_silu_and_mul",
    "reference_skinny_linear",
    "rms_norm",
    "rope_and_cache",
    "silu_and_mul",
    "skinny_linear",
    "skinny_linear_rope",
]
