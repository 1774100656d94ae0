"""The row-wise argmax kernel against torch.argmax (interpreted on CPU, compiled on GPU): ragged vocab
sizes over one and several chunks, ties, NaN and all -inf rows, fp32 / bf16, validation, and on GPU a
Llama-3-sized vocabulary."""

from __future__ import annotations

import pytest
import torch

from leanserve.kernels.argmax import argmax_rows, reference_argmax_rows

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    ("rows", "vocab", "dtype"),
    [(1, 100, torch.float32), (5, 9000, torch.float32), (3, 4096, torch.bfloat16)],  # 1 / 3 / 1 chunks
)
def test_matches_torch_argmax(rows, vocab, dtype):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, vocab, generator=gen).to(dtype)
    x[0, vocab // 2] = 100.0  # one clear winner
    if rows > 1:
        x[1] = 0.0  # all tied: the first column wins
    if rows > 2:
        x[2, [7, vocab - 1]] = 50.0  # tied across chunks
    if rows > 3:
        x[3] = -torch.inf  # nothing finite
    if rows > 4:
        x[4, [vocab - 3, 11]] = torch.nan  # NaN beats any number, the first NaN wins
    x = x.to(DEVICE)
    torch.testing.assert_close(argmax_rows(x), reference_argmax_rows(x), rtol=0, atol=0)


def test_strided_rows_and_no_rows():
    x = torch.randn(4, 300, device=DEVICE)[::2, :250]
    torch.testing.assert_close(argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
    assert argmax_rows(torch.empty(0, 10, device=DEVICE)).shape == (0,)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(10), "float \\[B, V\\]"),
        (torch.zeros(3, 10).t(), "unit column stride"),
        (torch.zeros(3, 10, dtype=torch.int64), "float"),
        (torch.zeros(3, 0), "1 to"),
    ],
)
def test_validation_errors(x, message):
    with pytest.raises(ValueError, match=message):
        argmax_rows(x)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64])
def test_gpu_llama3_vocab(rows):
    x = torch.randn(rows, 128256, device="cuda")
    x[:, 5] = x.max()  # a tie with the row's maximum at an earlier column
    torch.testing.assert_close(argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
