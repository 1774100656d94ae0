"""Batched token sampling on the logits' device: penalties, temperature, top-k / top-p / min-p, per-request
seeds and logprobs, with no host synchronisation. Host work per step is a handful of small tensors, each
built with one host->device copy; anything no row of the batch asks for is skipped."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from leanserve.kernels.ops import argmax_rows
from leanserve.server.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence of the batch."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Per-sequence generator for a request with a seed, on the logits' device, owned by the engine
    # (e.g. `torch.Generator(device).manual_seed(seed)`); None draws from the global generator.
    generator: torch.Generator | None
    # Tokens this row must not pick now (EOS and stop token ids before the request's min_tokens).
    banned_token_ids: frozenset[int] = frozenset()


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: torch.Tensor | None  # [B] float32: logprob of the sampled token (None if no row asked)
    top_ids: torch.Tensor | None  # [B, K] int64, K = max requested top logprobs (None if K == 0)
    top_logprobs: torch.Tensor | None  # [B, K] float32, sorted descending

    def to_host(self) -> tuple[SamplerOutput, torch.cuda.Event | None]:
        """Queue non-blocking copies of every tensor into pinned host memory. Returns the host copy and,
        on CUDA, an event to wait on before reading it: `.tolist()` on the device tensors would instead
        wait for everything queued after them, such as the next step."""
        if self.token_ids.device.type != "cuda":
            return self, None

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

        host = SamplerOutput(
            *(copy(t) for t in (self.token_ids, self.logprobs, self.top_ids, self.top_logprobs))
        )
        ready = torch.cuda.Event()
        ready.record()
        return host, ready


# Rows of the per-step float parameter table (one host->device copy for all of them).
_TEMP, _TOP_K, _TOP_P, _MIN_P, _REP, _PRES, _FREQ = range(7)


class Sampler:
    """Picks one token per row of a logits batch.

    Order of operations (vLLM semantics): logit bias and banned tokens, then repetition penalty over
    prompt + output tokens, then frequency and presence penalties over output tokens; greedy rows take
    the argmax of the biased and penalised logits; the others are divided by their temperature,
    truncated by top-k, top-p and min-p, and sampled. Logprobs are the log-softmax of the raw logits
    (before bias, penalties and temperature), as OpenAI and vLLM report.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], token_mask: np.ndarray | None = None
    ) -> SamplerOutput:
        """logits: [B, V] float32 on `device`, one row per entry of `rows`. token_mask: None (any token),
        or [B, ceil(V / 32)] int32 on the host, bit t % 32 of word t // 32 set where row b may pick token t
        (structured outputs, allowed_token_ids; a row that is free has every bit set)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        params = [row.params for row in rows]
        needs_penalties = any(has_penalty(p) for p in params)
        needs_sampling = not all(p.greedy for p in params)
        # A plain greedy batch needs no per-row parameters on the device at all.
        table = self._param_table(params) if needs_penalties or needs_sampling else None

        raw = logits
        if any(p.logit_bias for p in params) or any(row.banned_token_ids for row in rows):
            logits = self._apply_logit_bias(logits, rows)
        if token_mask is not None:
            logits = self._apply_token_mask(logits, token_mask)
        if needs_penalties:
            logits = self._apply_penalties(logits, rows, table)
        token_ids = argmax_rows(logits)  # on CUDA our kernel: torch reduces a 128k row in one block
        if needs_sampling:
            sampled = self._sample(logits, rows, table)
            greedy = table[_TEMP] == 0.0
            token_ids = torch.where(greedy, token_ids, sampled)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if not wanted:
            return SamplerOutput(token_ids, None, None, None)
        return token_logprobs(raw, token_ids, max(wanted))

    def _param_table(self, params: list[SamplingParams]) -> torch.Tensor:
        """[7, B] float32 on the device: temperature, top-k, top-p, min-p and the three penalties.

        Disabled knobs get values that make their operation a no-op for that row, so one batched
        operation serves rows that use it and rows that do not."""
        table = np.empty((7, len(params)), dtype=np.float32)
        for i, p in enumerate(params):
            table[:, i] = (
                p.temperature if not p.greedy else 0.0,
                p.top_k if 0 < p.top_k < self.vocab_size else self.vocab_size,
                # 2.0: the cumulative mass before a token (<= 1 up to rounding) never reaches it.
                p.top_p if p.top_p < 1.0 else 2.0,
                p.min_p,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
            )
        return self._to_device(table)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """One asynchronous host->device copy. Pinned memory comes from torch's caching host allocator,
        so the copy does not block the host, and the source stays alive until the copy has run."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _apply_logit_bias(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """A new [B, V] tensor with each row's biases added and its banned tokens at -inf (the raw
        logits stay for logprobs): the (row, token) indices and the biases, one host->device copy each."""
        biases = [{**r.params.logit_bias, **dict.fromkeys(r.banned_token_ids, -math.inf)} for r in rows]
        index = self._flat_token_index([list(b) for b in biases])
        bias = np.fromiter(chain.from_iterable(b.values() for b in biases), dtype=np.float32)
        biased = logits.clone()
        biased.view(-1).index_add_(0, index, self._to_device(bias))
        return biased

    def _apply_token_mask(self, logits: torch.Tensor, token_mask: np.ndarray) -> torch.Tensor:
        """The logits with every token a row's bitmask leaves out at -inf: one host->device copy of the
        packed bits (V / 8 bytes a row), unpacked on the device."""
        bits = self._to_device(token_mask)
        shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
        allowed = ((bits[:, :, None] >> shifts) & 1).view(bits.shape[0], -1)[:, : logits.shape[1]]
        return logits.masked_fill(allowed == 0, -math.inf)

    def _flat_token_index(self, token_lists: list[list[int]]) -> torch.Tensor:
        """[sum of lengths] int64 on the device: row * V + token for each token of each row's list."""
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
        flat += np.repeat(np.arange(len(token_lists), dtype=np.int64) * self.vocab_size, lengths)
        return self._to_device(flat)

    def _token_counts(self, token_lists: list[list[int]]) -> torch.Tensor:
        """[B, V] float32: how often each token occurs in each row's list, scattered on the device from
        one flat array of (row * V + token) indices."""
        index = self._flat_token_index(token_lists)
        counts = torch.zeros(len(token_lists) * self.vocab_size, dtype=torch.float32, device=self.device)
        counts.scatter_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=self.device))
        return counts.view(len(token_lists), self.vocab_size)

    def _apply_penalties(
        self, logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor
    ) -> torch.Tensor:
        """Builds the token counts (rows without penalties contribute no tokens, so nothing changes for
        them) and returns the penalised logits [B, V]."""
        output_counts = self._token_counts(
            [r.output_token_ids if has_penalty(r.params) else [] for r in rows]
        )
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            prompt = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in rows]
            seen = (self._token_counts(prompt) > 0) | (output_counts > 0)
        else:
            seen = None
        return apply_penalties(logits, seen, output_counts, table[_REP], table[_PRES], table[_FREQ])

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor) -> torch.Tensor:
        """[B] int64 tokens drawn from the truncated, temperature-scaled distribution of every row
        (greedy rows get a draw too, discarded by the caller)."""
        params = [row.params for row in rows]
        # Greedy rows divide by 1 instead of 0.
        temperature = torch.where(table[_TEMP] > 0, table[_TEMP], 1.0)
        logits = logits / temperature[:, None]
        if any(0 < p.top_k < self.vocab_size for p in params) or any(p.top_p < 1.0 for p in params):
            logits = self._top_k_top_p(logits, params, table)
        if any(p.min_p > 0.0 for p in params):
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
            threshold = logits.amax(dim=-1) + torch.log(table[_MIN_P])
            logits = logits.masked_fill(logits < threshold[:, None], -math.inf)
        probs = torch.softmax(logits, dim=-1)
        return argmax_rows(probs.div_(self._exponential_noise(probs, rows)))

    def _top_k_top_p(
        self, logits: torch.Tensor, params: list[SamplingParams], table: torch.Tensor
    ) -> torch.Tensor:
        """Masks to -inf the logits outside each row's top-k, then outside its top-p nucleus: the
        smallest set of most likely tokens whose probability reaches top_p. Top-k keeps every token
        tied with the k-th largest logit, so the result never depends on how ties are ordered."""
        if not any(p.top_p < 1.0 for p in params):  # top-k alone: a partial sort is enough
            max_k = max(p.top_k for p in params if 0 < p.top_k < self.vocab_size)
            top = logits.topk(max_k, dim=-1).values
            kth = top.gather(1, table[_TOP_K].clamp(max=max_k).long()[:, None] - 1)
            # Rows without top-k were clamped to max_k above: give them a threshold that keeps all.
            kth = kth.masked_fill(table[_TOP_K][:, None] >= self.vocab_size, -math.inf)
            return logits.masked_fill(logits < kth, -math.inf)
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        kth = sorted_logits.gather(1, table[_TOP_K].long()[:, None] - 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= table[_TOP_P][:, None]
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
        return logits.masked_fill(drop | (logits < kth), -math.inf)

    def _exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[B, V] Exp(1) draws. argmax(probs / noise) is a sample from probs (the exponential race), so
        sampling needs neither a multinomial nor a host sync. A seeded row draws from its own
        generator, the same V numbers whatever else is in the batch; the rest share one batched draw."""
        noise = torch.empty_like(probs).exponential_()
        for i, row in enumerate(rows):
            if row.generator is not None and not row.params.greedy:
                noise[i].exponential_(generator=row.generator)
        # A draw of exactly 0 would turn an excluded token's 0 / 0 into NaN, which argmax would pick.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerOutput:
    """The log-softmax of raw logits at `token_ids` and its top k (none for k = 0), as OpenAI and vLLM
    report logprobs. logits: [B, V] float32; token_ids: [B] int64, on the same device."""
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logprobs = logprobs_all.gather(1, token_ids[:, None]).squeeze(1)
    if k == 0:
        return SamplerOutput(token_ids, logprobs, None, None)
    top_logprobs, top_ids = logprobs_all.topk(k, dim=-1)  # sorted descending
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties; returns a new tensor (the caller's logits stay raw for logprobs).

    logits, output_counts: [B, V] float32; seen: [B, V] bool, tokens of the prompt or the output (None
    when no row has a repetition penalty); repetition, presence, frequency: [B] float32."""
    if seen is not None:
        rep = repetition[:, None]
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency[:, None] * output_counts
    return logits - presence[:, None] * (output_counts > 0).float()


def has_penalty(p: SamplingParams) -> bool:
    """The row needs its output tokens on the host (penalties count them)."""
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def token_bitmask(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """[ceil(V / 32)] int32: the bitmask (as `Sampler` takes it) that allows exactly `token_ids`."""
    allowed = np.zeros(-(-vocab_size // 32) * 32, dtype=bool)
    allowed[token_ids] = True
    return np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32)
