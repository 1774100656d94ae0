"""L2 prefetch of weights on a side stream, for decode steps whose attention is latency-bound: while a
layer's attention reads a short KV cache DRAM idles, and the start of its output projection's weights
can be streamed into L2 meanwhile (kernels.l2_prefetch). The model runner decides per step."""

from __future__ import annotations

import torch

from leanserve.kernels.l2_prefetch import prefetch_l2, supports_l2_prefetch


class SideStreamPrefetch:
    """Queues L2 prefetches on a side stream that forks from the current stream at each call, so a
    prefetch starts once everything queued before it has run and never delays the main stream's work.
    `join()` makes the current stream wait for all of them (a CUDA-graph capture must end joined).

    How much: a third of the L2 cache, at most the whole weight. The limit is the bytes DRAM delivers
    while attention runs: on an H100 (50 MB of L2), with Llama-3-8B's 32 MB bf16 output projection, 12 /
    16 / 20 / 24 / 32 MB ahead change a batch-1 layer chain's step by -75 / -88 / -85 / -60 / -10 us
    (docs/benchmarks.md, Engine): past ~16 MB the prefetch is still running when the product starts and
    competes with its reads. The same bytes take the same time whatever the weight's dtype, so an FP8
    output projection (16 MB) is prefetched whole."""

    @staticmethod
    def supported(device: torch.device) -> bool:
        return supports_l2_prefetch(device)

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self._l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size

    def __call__(self, weight: torch.Tensor) -> None:
        nbytes = min(self._l2_bytes // 3, weight.numel() * weight.element_size())
        self.stream.wait_stream(torch.cuda.current_stream(weight.device))
        with torch.cuda.stream(self.stream):
            prefetch_l2(weight, nbytes)

    def join(self) -> None:
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
