"""The decode-inputs kernel against its torch twin (interpreted on CPU, compiled on GPU): placeholders
resolved from the pending sampled ids, positions, slots in the right block, padded rows, tables wider
than one program's chunk and narrower than the static buffer, and validation."""

from __future__ import annotations

import pytest
import torch

from leanserve.kernels.decode_inputs import (
    DecodeInputs,
    decode_inputs,
    reference_decode_inputs,
    staged_size,
    staged_views,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCRATCH = 999


def _static_inputs(rows: int, max_width: int) -> DecodeInputs:
    """Buffers holding stale values, as a graph's static inputs do between steps."""
    return DecodeInputs(
        ids=torch.full((rows,), -7, dtype=torch.int64, device=DEVICE),
        positions=torch.full((rows,), -7, dtype=torch.int64, device=DEVICE),
        slots=torch.full((rows,), -7, dtype=torch.int64, device=DEVICE),
        seq_lens=torch.full((rows,), -7, dtype=torch.int32, device=DEVICE),
        block_tables=torch.full((rows, max_width), -7, dtype=torch.int32, device=DEVICE),
    )


def _staged(lens: list[int], tokens: list[int], block_size: int, width: int, rows: int) -> torch.Tensor:
    """Sequences with distinct shuffled blocks, padded to `rows` as the model runner pads them."""
    staged = torch.empty(staged_size(rows, width), dtype=torch.int32)
    seq_lens, ids, tables = staged_views(staged, rows, width)
    seq_lens.fill_(1)
    ids.fill_(0)
    tables.fill_(SCRATCH)
    gen = torch.Generator().manual_seed(width)
    for i, (n, token) in enumerate(zip(lens, tokens, strict=True)):
        used = -(-n // block_size)
        seq_lens[i], ids[i] = n, token
        tables[i, :used] = torch.randperm(500, generator=gen)[:used].int()
    return staged.to(DEVICE)


@pytest.mark.parametrize(
    ("lens", "tokens", "block_size", "width", "rows", "pending"),
    [
        ([1], [42], 16, 1, 1, None),  # one token, no step in flight
        ([17, 5, 48], [-2, 7, -1], 16, 3, 4, [11, 22]),  # placeholders, a padded row, a block boundary
        ([130 * 3, 2], [-1, 3], 3, 130, 2, [5]),  # tables past one 128-entry chunk; odd block size
    ],
)
def test_matches_reference(lens, tokens, block_size, width, rows, pending):
    staged = _staged(lens, tokens, block_size, width, rows)
    pending_tokens = torch.tensor(pending, device=DEVICE) if pending is not None else None
    got, want = _static_inputs(rows, width + 2), _static_inputs(rows, width + 2)
    decode_inputs(staged, pending_tokens, block_size, got)
    reference_decode_inputs(staged, pending_tokens, block_size, want)
    for name in ("ids", "positions", "slots", "seq_lens", "block_tables"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, msg=name)
    # The twin itself, against the meaning of each field.
    seq_lens, ids, tables = (t.cpu() for t in staged_views(staged, rows, width))
    resolved = [pending[-1 - t] if t < 0 else t for t in ids.tolist()]
    assert want.ids.tolist() == resolved
    assert want.positions.tolist() == [n - 1 for n in seq_lens.tolist()]
    slots = [int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
             for i, n in enumerate(seq_lens.tolist())]  # fmt: skip
    assert want.slots.tolist() == slots
    assert want.slots[len(lens) :].tolist() == [SCRATCH * block_size] * (rows - len(lens))
    assert (want.block_tables[:, width:] == -7).all()  # entries past the step's width stay untouched


def test_rejects_a_staged_array_of_the_wrong_shape():
    out = _static_inputs(2, 4)
    with pytest.raises(ValueError, match="int32"):
        decode_inputs(torch.zeros(2 * 7, dtype=torch.int32, device=DEVICE), None, 16, out)  # width 5 > 4
    with pytest.raises(ValueError, match="int32"):
        decode_inputs(torch.zeros(2 * 3, dtype=torch.int64, device=DEVICE), None, 16, out)
