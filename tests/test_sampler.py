"""Sampler tests: a plain-torch reference of the truncated distribution at the top, then greedy, seeds,
truncation (thousands of draws on crafted logits), penalties against a hand-computed example, logprobs,
and a mixed batch against each row sampled alone."""

from __future__ import annotations

import math

import pytest
import torch

from leanserve.server.engine.sampler import Sampler, SamplingRow, apply_penalties
from leanserve.server.engine.sampling_params import SamplingParams


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] -> [V]: the distribution a non-greedy row samples from, one rule at a time over a Python
    list (no penalties): temperature, top-k (ties with the k-th kept), top-p (smallest most-likely set
    reaching top_p), min-p (p >= min_p * p_max)."""
    scaled = (logits.double() / params.temperature).tolist()
    keep = set(range(len(scaled)))
    if params.top_k:
        kth = sorted(scaled, reverse=True)[params.top_k - 1]
        keep = {i for i in keep if scaled[i] >= kth}
    if params.top_p < 1.0:
        probs = _softmax_over(scaled, keep)
        mass, nucleus = 0.0, set()
        for i in sorted(keep, key=lambda i: -scaled[i]):
            if mass >= params.top_p:
                break
            nucleus.add(i)
            mass += probs[i]
        keep = nucleus
    if params.min_p > 0.0:
        probs = _softmax_over(scaled, set(range(len(scaled))))
        keep = {i for i in keep if probs[i] >= params.min_p * max(probs)}
    return torch.tensor(_softmax_over(scaled, keep), dtype=torch.float64)


def _softmax_over(scores: list[float], keep: set[int]) -> list[float]:
    top = max(scores[i] for i in keep)
    weights = [math.exp(s - top) if i in keep else 0.0 for i, s in enumerate(scores)]
    return [w / sum(weights) for w in weights]


def rows_of(params: SamplingParams, count: int, seed: int | None = None) -> list[SamplingRow]:
    """`count` rows with the same parameters; with a seed, row i gets its own generator seeded seed + i."""
    return [
        SamplingRow(params, [], [], None if seed is None else torch.Generator().manual_seed(seed + i))
        for i in range(count)
    ]


# Probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02 (a tail that any truncation must cut).
CRAFTED = torch.tensor([0.1, 0.25, 0.4, 0.02, 0.15, 0.05, 0.03]).log()


# A few rows with other parameters in the same batch switch the implementation between its top-k-only
# path (a partial sort) and its full-sort path, which must agree for every row.
COMPANIONS = {"alone": None, "with top-p": SamplingParams(top_p=0.9), "with top-k": SamplingParams(top_k=1)}


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=3), {2, 1, 4}),
        (SamplingParams(top_k=1), {2}),
        (SamplingParams(top_p=0.7), {2, 1, 4}),  # mass before token 4 is 0.65 < 0.7
        (SamplingParams(top_p=0.6), {2, 1}),  # ... and 0.65 >= 0.6
        (SamplingParams(min_p=0.3), {2, 1, 4}),  # p >= 0.12
        (SamplingParams(min_p=0.2), {2, 1, 4, 0}),  # p >= 0.08
        (SamplingParams(top_k=4, top_p=0.6), {2, 1}),
        (SamplingParams(top_k=2, min_p=0.2), {2, 1}),
        (SamplingParams(temperature=0.5, top_p=0.75), {2, 1}),  # sharper: 0.62, 0.24, 0.09, ...
        (SamplingParams(temperature=2.0, top_p=0.75), {2, 1, 4, 0}),  # flatter: 0.27, 0.21, 0.16, 0.13, 0.09
        (SamplingParams(temperature=1.5), set(range(7))),
    ],
)
@pytest.mark.parametrize("companion", sorted(COMPANIONS))
def test_truncation_never_picks_excluded_tokens(params, allowed, companion):
    draws = 4000
    reference = reference_probs(CRAFTED, params)
    assert {i for i, p in enumerate(reference.tolist()) if p > 0} == allowed

    rows = rows_of(params, draws)
    if COMPANIONS[companion] is not None:
        rows += rows_of(COMPANIONS[companion], 8)
    torch.manual_seed(0)
    out = Sampler(7, torch.device("cpu"))(CRAFTED.expand(len(rows), 7).clone(), rows)
    tokens = out.token_ids[:draws]
    assert set(tokens.tolist()) == allowed
    # 4.4 standard deviations (at worst, p = 0.5) of a frequency estimated from 4000 draws.
    freq = torch.bincount(tokens, minlength=7).double() / draws
    torch.testing.assert_close(freq, reference, atol=0.035, rtol=0)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_p=0.5), {0, 1}),  # mass before the third token is exactly 0.5
        (SamplingParams(top_p=0.5001), {0, 1, 2}),
        (SamplingParams(top_k=2), {0, 1, 2, 3}),  # every token tied with the k-th stays
    ],
)
def test_truncation_boundaries_on_ties(params, allowed):
    """Four equal logits (probabilities exactly 0.25): the nucleus stops as soon as the mass before a
    token reaches top_p, and among ties the lower token ids come first."""
    torch.manual_seed(0)
    out = Sampler(4, torch.device("cpu"))(torch.zeros(2000, 4), rows_of(params, 2000))
    assert set(out.token_ids.tolist()) == allowed


@pytest.mark.parametrize("vocab", [5, 989])
@pytest.mark.parametrize("batch", [1, 7, 19])
def test_greedy_is_argmax(batch, vocab):
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch))
    params = SamplingParams(temperature=0.0, top_k=2, top_p=0.1)  # truncation cannot change an argmax
    torch.manual_seed(0)
    out = Sampler(vocab, torch.device("cpu"))(logits, rows_of(params, batch))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_ids is None
    # An all-greedy batch skips sampling: the global generator has not moved.
    drawn = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(1))


def sample_sequence(logits: torch.Tensor, params: SamplingParams, seed: int, steps: int = 12) -> list[int]:
    """Tokens of `steps` steps of one seeded row over the same logits."""
    sampler = Sampler(logits.shape[-1], torch.device("cpu"))
    row = SamplingRow(params, [], [], torch.Generator().manual_seed(seed))
    return [sampler(logits[None], [row]).token_ids.item() for _ in range(steps)]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, min_p=0.01)])
def test_seed_reproduces_and_differs_across_seeds(params):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    runs = {seed: sample_sequence(logits, params, seed) for seed in range(6)}
    assert all(sample_sequence(logits, params, seed) == tokens for seed, tokens in runs.items())
    assert len({tuple(tokens) for tokens in runs.values()}) == len(runs)


def test_mixed_batch_matches_each_row_alone():
    vocab, steps = 301, 6
    logits = 3 * torch.randn(steps, 6, vocab, generator=torch.Generator().manual_seed(1))
    specs = [  # (params, prompt) of each row; seeded rows sample, the others are greedy
        (SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=2), [5, 6, 7]),
        (SamplingParams(temperature=0.7, top_k=20, seed=11), [1]),
        (SamplingParams(top_p=0.8, presence_penalty=1.0, frequency_penalty=0.5, seed=12, logprobs=0), [2]),
        (SamplingParams(temperature=1.3, min_p=0.05, seed=13, logprobs=5), [3, 3]),
        (SamplingParams(temperature=0.0), [4]),
        (SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=14), [9, 9, 8]),
    ]

    def new_rows() -> list[SamplingRow]:
        return [
            SamplingRow(p, prompt, [], None if p.seed is None else torch.Generator().manual_seed(p.seed))
            for p, prompt in specs
        ]

    sampler = Sampler(vocab, torch.device("cpu"))
    batch_rows, alone_rows = new_rows(), new_rows()
    for step in range(steps):
        batched = sampler(logits[step], batch_rows)
        for i, row in enumerate(alone_rows):
            alone = sampler(logits[step, i : i + 1], [row])
            assert batched.token_ids[i] == alone.token_ids[0], (step, i)
            if row.params.logprobs is not None:
                k = row.params.logprobs
                assert torch.equal(batched.logprobs[i], alone.logprobs[0])
                if k:
                    assert torch.equal(batched.top_ids[i, :k], alone.top_ids[0])
            row.output_token_ids.append(alone.token_ids[0].item())
            batch_rows[i].output_token_ids.append(batched.token_ids[i].item())
    assert batched.top_ids.shape == (6, 5)  # K is the largest number of alternatives asked for


# Hand-computed: prompt [0, 1], output [3, 3, 2]. Repetition 2 divides positive / multiplies negative
# logits of tokens 0-3; frequency 0.25 per output occurrence and presence 0.5 hit tokens 2 and 3 only.
RAW = [2.0, -1.0, 0.5, 3.0, -2.0, 1.25]
PENALISED = {
    "repetition": ((2.0, 0.0, 0.0), [1.0, -2.0, 0.25, 1.5, -2.0, 1.25]),
    "presence": ((1.0, 0.5, 0.0), [2.0, -1.0, 0.0, 2.5, -2.0, 1.25]),
    "frequency": ((1.0, 0.0, 0.25), [2.0, -1.0, 0.25, 2.5, -2.0, 1.25]),
    "all": ((2.0, 0.5, 0.25), [1.0, -2.0, -0.5, 0.5, -2.0, 1.25]),
}


@pytest.mark.parametrize("case", sorted(PENALISED))
def test_penalties_match_hand_computed(case):
    (repetition, presence, frequency), expected = PENALISED[case]
    params = SamplingParams(
        repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency
    )
    seen = torch.tensor([[True, True, True, True, False, False]])
    counts = torch.tensor([[0.0, 0.0, 1.0, 2.0, 0.0, 0.0]])
    got = apply_penalties(
        torch.tensor([RAW]), seen, counts, *(torch.tensor([x]) for x in (repetition, presence, frequency))
    )
    assert torch.equal(got, torch.tensor([expected]))

    # Through the sampler: seeded draws from the raw logits with penalties equal draws from the
    # hand-penalised logits without (same noise), and greedy picks the penalised argmax.
    draws, sampler = 256, Sampler(6, torch.device("cpu"))
    penalised_rows = [
        SamplingRow(params, [0, 1], [3, 3, 2], torch.Generator().manual_seed(7 + i)) for i in range(draws)
    ]
    plain_rows = rows_of(SamplingParams(), draws, seed=7)
    with_penalty = sampler(torch.tensor([RAW]).expand(draws, 6), penalised_rows).token_ids
    by_hand = sampler(torch.tensor([expected]).expand(draws, 6), plain_rows).token_ids
    assert torch.equal(with_penalty, by_hand)
    greedy = SamplingParams(
        temperature=0.0, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency
    )
    out = sampler(torch.tensor([RAW]), [SamplingRow(greedy, [0, 1], [3, 3, 2], None)])
    assert out.token_ids.item() == max(range(6), key=lambda i: expected[i])


def test_rows_without_penalties_build_no_penalty_tensors(monkeypatch):
    sampler = Sampler(50, torch.device("cpu"))
    monkeypatch.setattr(sampler, "_token_counts", lambda _: pytest.fail("penalty tensors built"))
    rows = rows_of(SamplingParams(top_k=5, seed=1), 3, seed=1) + rows_of(SamplingParams(temperature=0), 2)
    assert sampler(torch.randn(5, 50), rows).token_ids.shape == (5,)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_bans_and_forces_tokens_per_row(temperature):
    vocab = 7
    logits = CRAFTED.repeat(4, 1)  # token 2 most likely, then 1, 4
    banned = {2: -100.0, 1: -100.0}
    rows = [
        SamplingRow(SamplingParams(temperature=temperature, logit_bias=banned, logprobs=0), [], [], None),
        SamplingRow(SamplingParams(temperature=temperature, logit_bias={6: 100.0}), [], [], None),
        SamplingRow(SamplingParams(temperature=temperature), [], [], None),  # no bias: unaffected
        SamplingRow(SamplingParams(temperature=temperature, logit_bias={3: 1.5}), [], [], None),
    ]
    sampler = Sampler(vocab, torch.device("cpu"))
    for _ in range(50):
        out = sampler(logits, rows)
        assert out.token_ids[0] not in (1, 2) and out.token_ids[1] == 6
        if temperature == 0.0:
            assert out.token_ids[0] == 4 and out.token_ids[2] == 2
            # logprobs stay those of the raw logits (OpenAI and vLLM report them before any bias)
            torch.testing.assert_close(out.logprobs[0], torch.log_softmax(CRAFTED, dim=0)[4])
    # A bias shifts its token's logit by exactly its value and leaves every other logit as it was.
    biased = sampler._apply_logit_bias(logits, rows)
    torch.testing.assert_close(biased[3], CRAFTED + torch.tensor([0, 0, 0, 1.5, 0, 0, 0]))
    assert torch.equal(biased[2], CRAFTED)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_tokens_are_never_picked(temperature):
    """min_tokens bans (EOS and stop ids before the minimum) on top of a bias, per row."""
    logits = CRAFTED.repeat(3, 1)  # token 2 most likely, then 1, 4
    params = SamplingParams(temperature=temperature, logit_bias={1: 100.0}, logprobs=0)
    rows = [
        SamplingRow(params, [], [], None, banned_token_ids=frozenset({1, 2})),  # the ban beats the bias
        SamplingRow(params, [], [], None),  # the same bias, nothing banned: forced to 1
        SamplingRow(SamplingParams(temperature=temperature), [], [], None, banned_token_ids=frozenset({2})),
    ]
    sampler = Sampler(7, torch.device("cpu"))
    for _ in range(50):
        out = sampler(logits, rows)
        assert out.token_ids[0] not in (1, 2) and out.token_ids[1] == 1 and out.token_ids[2] != 2
        if temperature == 0.0:
            assert out.token_ids[0] == 4 and out.token_ids[2] == 1
            torch.testing.assert_close(out.logprobs[0], torch.log_softmax(CRAFTED, dim=0)[4])  # raw


def test_min_tokens_limits():
    SamplingParams(max_tokens=5, min_tokens=5)
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="min_tokens"):
            SamplingParams(max_tokens=5, min_tokens=bad)


def test_logit_bias_limits():
    SamplingParams(logit_bias={t: 100.0 for t in range(300)})
    for bad in ({1: 100.5}, {1: -101.0}, {t: 1.0 for t in range(301)}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


@pytest.mark.parametrize("requested", [[0], [3, None, 1], [None, 20], [None, None]])
def test_logprobs_are_log_softmax_of_raw_logits(requested):
    vocab = 97
    logits = torch.randn(len(requested), vocab, generator=torch.Generator().manual_seed(3))
    rows = [
        SamplingRow(SamplingParams(logprobs=k, repetition_penalty=1.5, temperature=0.5), [1, 2], [3], None)
        for k in requested
    ]
    out = Sampler(vocab, torch.device("cpu"))(logits, rows)
    asked = [k for k in requested if k is not None]
    if not asked:
        assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
        return
    expected = torch.log_softmax(logits, dim=-1)  # penalties and temperature do not enter logprobs
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    if max(asked) == 0:
        assert out.top_ids is None and out.top_logprobs is None
        return
    assert out.top_ids.shape == out.top_logprobs.shape == (len(requested), max(asked))
    torch.testing.assert_close(out.top_logprobs, expected.gather(1, out.top_ids))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.equal(out.top_ids[:, 0], logits.argmax(dim=-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_gpu():
    device = torch.device("cuda")
    vocab = 32000
    sampler = Sampler(vocab, device)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=3), [1, 2], [3], None),
        SamplingRow(
            SamplingParams(top_k=40, top_p=0.9, min_p=0.05, seed=1, repetition_penalty=1.1),
            [4],
            [5, 5],
            torch.Generator(device).manual_seed(1),
        ),
        SamplingRow(SamplingParams(frequency_penalty=0.5, logit_bias={9: -100.0, 11: 2.0}), [6], [7], None),
        SamplingRow(SamplingParams(temperature=0.0), [8], [], None, banned_token_ids=frozenset({2, 3})),
    ]
    logits = torch.randn(4, vocab, device=device)
    sampler(logits, rows)  # warm-up: pinned host blocks, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.device.type == "cuda" and out.top_ids.shape == (4, 3)
