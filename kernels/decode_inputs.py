"""A decode step's inputs on the device in one launch (Triton): from one staged array of sequence
lengths, last tokens and block tables, the token ids (placeholders resolved against the in-flight step's
sampled ids), positions, KV-cache slots, lengths and the block tables at their full row stride.

A CUDA-graph decode step reads these from static buffers that must be refilled before every replay.
Filling them tensor by tensor takes five host->device copies (one of them through a copy kernel into the
strided table) and six small torch kernels resolving placeholders: about a dozen stream operations of a
few microseconds each ahead of every replay. Here it is one copy and one kernel. The torch twin is
`reference_decode_inputs`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class DecodeInputs:
    """The static inputs of a decode step, one row per sequence (rows past the batch are padding).
    ids: [B] int64; positions: [B] int64; slots: [B] int64 (block * block_size + offset of the new token);
    seq_lens: [B] int32 (cache length including the new token); block_tables: [B, W] int32."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor

    def rows(self, count: int) -> DecodeInputs:
        """The first `count` rows (views)."""
        return DecodeInputs(*(t[:count] for t in (self.ids, self.positions, self.slots, self.seq_lens,
                                                   self.block_tables)))  # fmt: skip


def staged_size(rows: int, width: int) -> int:
    """int32 elements of the staged array for `rows` sequences with tables of `width` blocks."""
    return rows * (2 + width)


def staged_views(
    staged: torch.Tensor, rows: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of a staged int32 array (host or device): seq_lens [rows], last token ids [rows] (a
    negative id -(r + 1) stands for row r of the pending sampled ids) and block tables [rows, width]."""
    tables = staged[2 * rows : staged_size(rows, width)].view(rows, width)
    return staged[:rows], staged[rows : 2 * rows], tables


# The table width changes as sequences grow: specialising on it (Triton's divisible-by-16 and == 1 variants)
# would compile the kernel again mid-serving (~70 ms steps in a 64-way Llama-3-8B bench_engine.py run on an
# H100, docs/benchmarks.md).
@triton.jit(do_not_specialize=["rows", "width", "stride_table", "block_size"])
def _decode_inputs_kernel(
    staged_ptr, pending_ptr, ids_ptr, positions_ptr, slots_ptr, seq_lens_ptr, tables_ptr,
    rows, width, stride_table, block_size, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seq_len = tl.load(staged_ptr + row)
    token = tl.load(staged_ptr + rows + row).to(tl.int64)
    pending = tl.load(pending_ptr + tl.maximum(-1 - token, 0), mask=token < 0, other=0)
    tl.store(ids_ptr + row, tl.where(token < 0, pending, token))
    tl.store(positions_ptr + row, (seq_len - 1).to(tl.int64))
    tl.store(seq_lens_ptr + row, seq_len)
    table = staged_ptr + 2 * rows + row * width
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < width
        tl.store(tables_ptr + row * stride_table + offs, tl.load(table + offs, mask=mask), mask=mask)
    last = seq_len - 1
    block = tl.load(table + last // block_size).to(tl.int64)
    tl.store(slots_ptr + row, block * block_size + last % block_size)


def decode_inputs(
    staged: torch.Tensor, pending_tokens: torch.Tensor | None, block_size: int, out: DecodeInputs
) -> None:
    """Fill `out` (B rows) from `staged` (int32, laid out as staged_views(staged, B, W) says, W <= out's
    table width; every length >= 1 and within its table) and the pending sampled ids [R] int64 that
    placeholders index (None when there are none). Only the first W entries of each table row are
    written. No host synchronisation."""
    rows, width = out.block_tables.shape[0], _table_width(staged, out)
    if rows:
        _decode_inputs_kernel[(rows,)](
            staged, out.ids if pending_tokens is None else pending_tokens, out.ids, out.positions, out.slots,
            out.seq_lens, out.block_tables, rows, width, out.block_tables.stride(0), block_size, BLOCK=128,
            num_warps=1,
        )  # fmt: skip


def _table_width(staged: torch.Tensor, out: DecodeInputs) -> int:
    """W of a staged array for out's rows, checked (ValueError)."""
    rows, max_width = out.block_tables.shape
    width = staged.numel() // rows - 2 if rows else 0
    if staged.dtype != torch.int32 or staged.numel() != staged_size(rows, width) or width > max_width:
        raise ValueError(f"staged must be int32 of {rows} x (2 + W <= {2 + max_width}) elements")
    return width


def resolve_placeholders(ids: torch.Tensor, pending_tokens: torch.Tensor | None) -> torch.Tensor:
    """In place: every placeholder -(r + 1) in the int64 `ids` becomes pending_tokens[r] (torch ops on
    ids' device, no sync). The eager steps' form of what `decode_inputs` does for graph replays."""
    if pending_tokens is not None and pending_tokens.numel():
        rows = (-1 - ids).clamp_(min=0)
        ids.copy_(torch.where(ids < 0, pending_tokens[rows], ids))
    return ids


def reference_decode_inputs(
    staged: torch.Tensor, pending_tokens: torch.Tensor | None, block_size: int, out: DecodeInputs
) -> None:
    """Torch twin of `decode_inputs`."""
    width = _table_width(staged, out)
    seq_lens, tokens, tables = staged_views(staged, out.ids.shape[0], width)
    last = seq_lens.long() - 1
    out.ids.copy_(resolve_placeholders(tokens.long(), pending_tokens))
    out.positions.copy_(last)
    out.seq_lens.copy_(seq_lens)
    out.block_tables[:, :width].copy_(tables)
    blocks = tables.long().gather(1, (last // block_size)[:, None])[:, 0]
    out.slots.copy_(blocks * block_size + last % block_size)
