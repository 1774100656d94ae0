"""Decode attention kernels: Triton LeanAttention (stream-K) over a paged KV cache and its torch twin.

Note: a PyPI distribution named `kernels` (Hugging Face's kernel hub) exists and transformers probes
for it by import name. Ours is found under the `leanserve` distribution (version 0.x, outside the
0.18-0.19 window transformers accepts) or without metadata (editable), so it is never taken for it;
tests/test_foundation.py guards this."""

from kernels.lean_attention import lean_attention_decode
from kernels.reference import reference_decode_attention

__all__ = ["lean_attention_decode", "reference_decode_attention"]
