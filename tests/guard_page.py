"""CPU tensors that end exactly where an inaccessible page begins, so an interpreted Triton kernel that
reads or writes one element past its input crashes the test instead of touching a neighbour's memory
(what on a GPU is an illegal address only when the neighbour happens to be unmapped)."""

from __future__ import annotations

import ctypes
import mmap

import torch

_MAPPED: list[mmap.mmap] = []  # keeps every guarded buffer mapped for the whole session


def against_guard_page(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of t whose last byte is followed by a PROT_NONE page, laid out as torch.empty_like lays
    t out: with t's strides where t is dense (a head-major KV cache's transposed view stays one),
    contiguous elsewhere."""
    page, nbytes = mmap.PAGESIZE, t.numel() * t.element_size()
    data_pages = -(-nbytes // page)
    buf = mmap.mmap(-1, (data_pages + 1) * page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + data_pages * page), page, 0) == 0  # PROT_NONE
    _MAPPED.append(buf)
    flat = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=data_pages * page - nbytes)
    return flat.as_strided(t.shape, torch.empty_like(t, device="meta").stride()).copy_(t)
