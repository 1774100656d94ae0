"""Decoder models (Llama family), weight loading, the paged KV cache and its block manager."""
