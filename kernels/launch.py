"""How our Triton kernels are launched: interpreted on CPU (TRITON_INTERPRET=1) or compiled for a GPU,
and on Hopper and later with programmatic dependent launch (PDL).

A decode step at batch 1 is a chain of ~300 short kernels inside a CUDA graph, and every kernel boundary
costs the launch of the next grid after the previous one has drained. With PDL the next grid is
scheduled while the previous one still runs. Our elementwise kernels and the skinny matrix product
(the whole chain of a decoder layer except attention) follow one protocol, so any two of them can
follow each other: a kernel first waits (`gdc_wait`: the previous grid has finished and its writes are
visible; since that grid waited in turn, so has everything before it in the stream), then lets its
successor be scheduled (`gdc_launch_dependents`), then works. At most one grid is ever waiting ahead of
the running one. On an H100 a Llama-3-8B layer chain at batch 1 (one CUDA graph) takes 5.96 ms a step
with PDL and 6.15 ms without (docs/benchmarks.md, Engine); letting the successor in before the wait (two
grids ahead) and prefetching the next product's weights into L2 while waiting were slower there.
LeanAttention takes part differently: it reads the lengths and block tables and partitions the work
before its wait (inputs of the step, written long before the kernel ahead of it ran): 5968 us a step in
that chain against 6009 us waiting first (mean of three passes). It never lets its successor in early
(the output projection's programs queued beside it cost 40-80 us a step there). Kernels launched without PDL
(torch's) keep full stream order."""

from __future__ import annotations

import functools
import os
import sys

import torch
import triton
import triton.language as tl

# Benchmarks switch this off to measure what PDL buys; serving leaves it on.
PDL_ENABLED = True


def interpreted() -> bool:
    """Kernels run under TRITON_INTERPRET (CPU). Its bf16 tl.dot is wrong (triton issue 11584), so kernels
    that use tl.dot upcast their operands there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grids are sized by it); 1 elsewhere (the interpreter
    runs programs in turn)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.cache
def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA device (Triton's own limit, opt-in
    included); no limit elsewhere (the interpreter). Cached: launchers ask on every call."""
    if device.type != "cuda":
        return sys.maxsize
    return triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]


def use_pdl(device: torch.device) -> bool:
    """Launch with PDL: a compiled kernel on a CUDA device of compute capability 9.0 or later."""
    return PDL_ENABLED and device.type == "cuda" and not interpreted() and _hopper_or_later(device)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """The protocol above, at the top of a kernel launched with `launch_pdl=PDL`: wait for the previous
    grid, then let the next one be scheduled. A no-op when PDL is off."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
