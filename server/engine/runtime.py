"""Process-wide setup, done once by each process's entry point (the CLI, a tensor-parallel worker, a
benchmark) rather than by library code: which BLAS library torch's products use, the NCCL environment,
the global seed, and keeping the loaded model out of the cyclic garbage collector."""

from __future__ import annotations

import atexit
import gc
import os

import torch

from leanserve.models.parallel import NVLINK_MULTICAST_OFF


def setup_process(device_type: str, seed: int | None = None) -> None:
    """Before the model loads. On CUDA, torch's matrix products (those the skinny kernel does not take:
    larger decode batches, prefill, the down projection past 16 rows) go to cuBLASLt: on an H100 (bf16,
    Llama-3-8B; bench_engine.py --profile, docs/benchmarks.md) the down projection at 128 rows takes
    45.2 us instead of 53.2 (cuBLAS splits K there and adds a reduction kernel), the other products
    within 1% at 8-2048 rows. NVLink
    multicast stays off: the shared multi-GPU hosts we run on require it, and the small all-reduces of
    decode do not need it (tensor-parallel workers inherit the environment). The seed drives unseeded
    sampling (the engine's process; workers do not sample)."""
    if device_type == "cuda":
        torch.backends.cuda.preferred_blas_library("cublaslt")
        os.environ.update(NVLINK_MULTICAST_OFF)
    if seed is not None:
        torch.manual_seed(seed)


def settle_process() -> None:
    """After the model loads: the model, tokenizer and CUDA graphs are many long-lived objects; frozen
    out of the cyclic collector, whose full passes would otherwise stall decode steps by milliseconds.
    Frozen objects are not collected at exit either: Triton's binding objects in reference cycles would
    outlive nanobind's internals, which then print "nanobind: leaked ... functions!"; unfrozen at exit,
    they go in the interpreter's final collection."""
    gc.freeze()
    atexit.register(gc.unfreeze)
