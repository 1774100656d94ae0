"""Engine end to end on a tiny random Llama (fp32, greedy): batching, chunked prefill, preemption, n > 1,
prefix caching, prompt logprobs, abort, stop conditions, step failures and the async streaming wrapper.
Every test ends with the KV pool all free. On a GPU the same tests run with CUDA graphs, plus
eager-vs-graph equality."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from leanserve.models.attention import AttentionReading
from leanserve.server.engine import engine_setup, model_runner
from leanserve.server.engine.async_engine import AsyncEngine
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import InvalidParameter, SamplingParams
from leanserve.server.engine.scheduler import SchedulerOutput
from leanserve.server.engine.warm_up import warm_up, warm_up_steps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT_LENS = [1, 5, 17, 33, 40, 64]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def make_engine(tiny_model_path):
    made: dict[tuple, LLMEngine] = {}

    def make(**overrides) -> LLMEngine:
        settings = dict(model=str(tiny_model_path), device=DEVICE, dtype="float32", kv_cache_tokens=4096)
        settings |= dict(max_num_seqs=16) | overrides
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = LLMEngine.from_config(EngineConfig(**settings))
        return made[key]

    # Several engines live side by side here: on a GPU size their pools like on CPU (kv_cache_tokens)
    # instead of each taking 90% of the card.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            engine_setup, "num_kv_blocks", lambda config, *_: config.kv_cache_tokens // config.block_size
        )
        yield make


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in PROMPT_LENS]


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_all(
    engine: LLMEngine,
    requests: dict[str, tuple[list[int], SamplingParams]],
    prompt_logprobs: dict | None = None,
) -> dict:
    """Add every request, step until done; returns request id -> (final output, tokens of each sample),
    checks the pool. Prompt logprobs, if asked, go to `prompt_logprobs` by request id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    tokens: dict[tuple[str, int], list[int]] = {}
    final = {}
    while engine.has_work:
        for out in engine.step():
            for sample in out.samples:
                tokens.setdefault((out.request_id, sample.index), []).extend(sample.token_ids)
            if out.prompt_logprobs is not None:
                assert prompt_logprobs is not None and out.request_id not in prompt_logprobs  # once
                prompt_logprobs[out.request_id] = out.prompt_logprobs
            if out.finished:
                final[out.request_id] = out
    assert_pool_free(engine)
    return {
        rid: (final[rid], [tokens.get((rid, i), []) for i in range(p.n)]) for rid, (_, p) in requests.items()
    }


def assert_pool_free(engine: LLMEngine) -> None:
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.pool.num_blocks
    assert not engine.requests


@pytest.fixture(scope="module")
def reference(make_engine) -> list[list[int]]:
    """Greedy tokens of each prompt run alone."""
    engine = make_engine()
    return [run_all(engine, {"solo": (p, greedy())})["solo"][1][0] for p in prompts()]


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_num_batched_tokens=2048),
        dict(max_num_batched_tokens=16),  # chunked prefill beside decodes
        dict(kv_cache_tokens=96, block_size=8, max_num_batched_tokens=32),  # 12 blocks: preemption
        dict(enforce_eager=True, enable_prefix_caching=False),
        dict(async_scheduling=False),
        dict(async_scheduling=True, max_num_batched_tokens=16),
        dict(async_scheduling=True, kv_cache_tokens=96, block_size=8, max_num_batched_tokens=32),
    ],
    ids=[
        "batched",
        "chunked",
        "preempting",
        "eager-no-prefix-cache",
        "sync",
        "async-chunked",
        "async-preempting",
    ],
)
def test_batched_decoding_matches_one_at_a_time(make_engine, reference, settings):
    engine = make_engine(**settings)
    preemptions = engine.scheduler.num_preemptions
    results = run_all(engine, {f"r{i}": (p, greedy()) for i, p in enumerate(prompts())})
    for i, expected in enumerate(reference):
        out, (tokens,) = results[f"r{i}"]
        assert tokens == expected, f"prompt {i} (len {PROMPT_LENS[i]})"
        assert out.samples[-1].finish_reason == "length" and out.completion_tokens == MAX_TOKENS
        assert out.attention_seconds > 0
    if "kv_cache_tokens" in settings:
        assert engine.scheduler.num_preemptions > preemptions


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_share_prompt_blocks(make_engine, reference, prefix_caching):
    engine = make_engine(enable_prefix_caching=prefix_caching)
    prompt = prompts()[4]  # 40 tokens: two full blocks and a partial one
    engine.add_request("n3", prompt, greedy(n=3))
    while all(s.num_computed_tokens < len(prompt) for s in engine.requests["n3"].sequences):
        engine.step()
    seqs = engine.requests["n3"].sequences
    tables = [engine.block_manager.block_table(s.seq_id) for s in seqs]
    assert len(seqs) == 3
    assert all(t[:2] == tables[0][:2] for t in tables), "full prompt blocks are shared"
    assert len({t[2] for t in tables}) == 3, "each sample owns a copy of the partial last block"
    while engine.has_work:
        engine.step()
    assert_pool_free(engine)
    results = run_all(engine, {"again": (prompt, greedy(n=3))})
    out, samples = results["again"]
    assert samples == [reference[4]] * 3 and out.completion_tokens == 3 * MAX_TOKENS


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_sampling_and_logprobs_do_not_depend_on_the_batch(make_engine, async_scheduling):
    seeded = SamplingParams(
        temperature=1.0, top_k=50, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3
    )
    alone = run_all(make_engine(), {"s": (prompts()[3], seeded)})["s"]
    crowded = make_engine(  # preempts
        kv_cache_tokens=96, block_size=8, max_num_batched_tokens=32, async_scheduling=async_scheduling
    )
    others = {f"o{i}": (p, greedy()) for i, p in enumerate(prompts())}
    batched = run_all(crowded, {"s": (prompts()[3], seeded), **others})["s"]
    assert alone[1] == batched[1]
    entries = [e for o in [alone[0]] for s in o.samples for e in s.logprobs or []]
    assert entries and all(len(e.top) == 3 and e.logprob <= 0 for e in entries)
    # Token texts are decoded text, as OpenAI reports them, not BPE symbols such as "Ġword".
    tokenizer = make_engine().tokenizer
    assert all(e.token == tokenizer.decode([e.token_id]) and "Ġ" not in e.token for e in entries)


def test_repeated_prompt_hits_prefix_cache(make_engine, reference):
    engine = make_engine()
    prompt = prompts()[5]  # 64 tokens
    first = run_all(engine, {"a": (prompt, greedy())})["a"]
    hits = engine.block_manager.prefix_hits
    stats_hits = engine.stats().prefix_cache_hits
    second = run_all(engine, {"b": (prompt, greedy())})["b"]
    assert second[0].cached_prompt_tokens == 48  # three full blocks; the last token is always computed
    assert engine.block_manager.prefix_hits - hits == 48
    assert engine.stats().prefix_cache_hits - stats_hits == 48
    assert first[1] == second[1] == [reference[5]]


@pytest.fixture(scope="module")
def full_forward_logprobs(tiny_model_path) -> list[torch.Tensor]:
    """Per prompt, [len - 1, vocab]: the log-softmax of HF transformers' logits from one forward over
    the whole prompt (row t scores the token after position t), on CPU."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [torch.log_softmax(hf(torch.tensor([p])).logits[0, :-1], dim=-1) for p in prompts()]


def assert_prompt_scores(entries, prompt: list[int], expected: torch.Tensor, k: int) -> None:
    assert [e.token_id for e in entries] == prompt
    assert entries[0].logprob is None and entries[0].top == []  # nothing scores the first token
    if len(prompt) == 1:
        return
    # fp32 both, but another order of the sums (chunks over a paged cache, other matrix products): the
    # tolerance of tests/test_models.py's logits against HF.
    tol = dict(rtol=1e-4, atol=1e-4)
    got = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(got, expected[torch.arange(len(prompt) - 1), prompt[1:]], **tol)
    top_ids = torch.tensor([[t for t, _, _ in e.top] for e in entries[1:]])
    top_lps = torch.tensor([[lp for _, _, lp in e.top] for e in entries[1:]])
    # Our top k are the reference's: their values, and the reference's own values at our ids (so that
    # near ties ordered differently do not fail).
    torch.testing.assert_close(top_lps, expected.topk(k).values, **tol)
    torch.testing.assert_close(top_lps, expected.gather(1, top_ids), **tol)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_match_a_full_forward(
    make_engine, reference, full_forward_logprobs, async_scheduling, monkeypatch
):
    """Every prompt scored while its prefill runs in 16-token chunks beside the others: each prompt
    token's logprob and top 3 equal the log-softmax of one forward over the whole prompt. Logits are
    made 7 rows at a time here, so the slices cut across chunks. max_tokens=0 ends a request at its
    prefill without a token; others generate what they would unscored."""
    monkeypatch.setattr(model_runner, "_SCORE_ROWS", 7)
    engine = make_engine(max_num_batched_tokens=16, async_scheduling=async_scheduling)
    requests = {
        f"p{i}": (p, greedy(max_tokens=3 * (i % 2), n=2 if i in (1, 4) else 1, prompt_logprobs=3))
        for i, p in enumerate(prompts())
    }
    scored: dict = {}
    results = run_all(engine, requests, scored)
    for i, prompt in enumerate(prompts()):
        assert_prompt_scores(scored[f"p{i}"], prompt, full_forward_logprobs[i], 3)
        out, samples = results[f"p{i}"]
        params = requests[f"p{i}"][1]
        assert samples == [reference[i][: params.max_tokens]] * params.n
        assert [s.finish_reason for s in out.samples][-params.n :] == ["length"] * params.n
        assert out.completion_tokens == params.max_tokens * params.n and out.cached_prompt_tokens == 0


def test_a_prompt_preempted_while_scored_is_scored_whole_once(make_engine, full_forward_logprobs):
    """Preempted after two of its four chunks (one still in flight), the prompt is recomputed from the
    start: its scores come once, complete and right."""
    engine = make_engine(max_num_batched_tokens=16, async_scheduling=True)
    prompt = prompts()[5]  # 64 tokens
    engine.add_request("s", prompt, greedy(max_tokens=2, prompt_logprobs=2))
    outputs = engine.step() + engine.step()
    seq = engine.requests["s"].sequences[0]
    assert seq.num_computed_tokens == 32 and engine.pipeline.in_flight is not None
    engine.scheduler._preempt(seq, SchedulerOutput())  # as a decode that finds no free block does
    while engine.has_work:
        outputs += engine.step()
    assert_pool_free(engine)
    (scored,) = [out.prompt_logprobs for out in outputs if out.prompt_logprobs is not None]
    assert_prompt_scores(scored, prompt, full_forward_logprobs[5], 2)
    assert sum(len(s.token_ids) for out in outputs for s in out.samples) == 2


def test_scored_prompts_skip_the_prefix_cache_and_fill_it(make_engine, full_forward_logprobs):
    """Cached blocks have no logits: a scored prompt computes all of it, twice in a row too, with the
    same complete scores; its blocks serve later unscored requests."""
    engine = make_engine(max_num_batched_tokens=16)
    prompt = prompts()[5]  # 64 tokens
    runs = []
    for request_id in ("first", "second"):
        scored: dict = {}
        out, _ = run_all(engine, {request_id: (prompt, greedy(max_tokens=0, prompt_logprobs=1))}, scored)[
            request_id
        ]
        assert out.cached_prompt_tokens == 0
        assert_prompt_scores(scored[request_id], prompt, full_forward_logprobs[5], 1)
        runs.append(scored[request_id])
    assert runs[0] == runs[1]
    assert run_all(engine, {"plain": (prompt, greedy())})["plain"][0].cached_prompt_tokens == 48


def test_attention_time_is_split_by_kv_tokens(make_engine, monkeypatch):
    # Synchronous steps, so the patched reading below is the decode step's own (with asynchronous
    # scheduling, the default on CUDA, a step's reading is taken in the next step() call).
    engine = make_engine(async_scheduling=False)
    for request_id, prompt in (("short", prompts()[1]), ("long", prompts()[5])):
        engine.add_request(request_id, prompt, greedy())
    engine.step()  # both prompts
    requests = {rid: engine.requests[rid] for rid in ("short", "long")}
    before = {rid: r.attention_seconds for rid, r in requests.items()}
    kv_tokens = {rid: len(r.sequences[0].token_ids) for rid, r in requests.items()}
    with monkeypatch.context() as patch:
        patch.setattr(AttentionReading, "seconds", lambda self: (0.0, 1.0))  # 1 s of decode attention
        engine.step()  # one decode each
    got = {rid: r.attention_seconds - before[rid] for rid, r in requests.items()}
    assert got["short"] + got["long"] == pytest.approx(1.0)
    assert got["short"] / got["long"] == pytest.approx(kv_tokens["short"] / kv_tokens["long"])
    while engine.has_work:
        engine.step()
    assert_pool_free(engine)


def test_async_scheduling_gives_the_same_outputs(make_engine, monkeypatch):
    """Running a step ahead changes nothing a client sees: tokens, text, finish reasons, logprobs and
    token counts equal the synchronous engine's for stop tokens and strings, EOS, n > 1, penalties
    (which make the engine wait for the tokens) and seeded sampling."""
    base = prompts(seed=3)
    sync_out = run_all(make_engine(async_scheduling=False), {"probe": (base[2], greedy(max_tokens=12))})
    probe = sync_out["probe"][1][0]
    text = make_engine().tokenizer.decode(probe)
    requests = {
        "stop-id": (base[2], greedy(max_tokens=12, stop_token_ids=[probe[5]])),
        "stop-str": (base[2], greedy(max_tokens=12, stop=[text[len(text) // 2 : len(text) // 2 + 2]])),
        "eos": (base[2], SamplingParams(temperature=0.0, max_tokens=12)),
        "n2": (base[3], greedy(n=2, max_tokens=7)),
        "penalty": (base[4], greedy(frequency_penalty=0.5, presence_penalty=0.3, max_tokens=3)),
        "seeded": (base[5], SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=8, logprobs=2)),
        "short": (base[0], greedy(max_tokens=1)),
    }
    sync_engine, async_engine = make_engine(async_scheduling=False), make_engine(async_scheduling=True)
    for engine in (sync_engine, async_engine):
        monkeypatch.setattr(engine.scheduler, "eos_token_ids", frozenset({probe[3]}))

    def summary(results):
        return {
            rid: (
                tokens,
                [s.finish_reason for s in out.samples],
                out.completion_tokens,
                [(e.token_id, round(e.logprob, 4)) for s in out.samples for e in s.logprobs or []],
            )
            for rid, (out, tokens) in results.items()
        }

    def run_with_text(engine):
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        texts: dict[str, str] = {}
        ran_ahead = 0
        while engine.has_work:
            for out in engine.step():
                texts[out.request_id] = texts.get(out.request_id, "") + "".join(s.text for s in out.samples)
            ran_ahead += engine.pipeline.in_flight is not None
        assert_pool_free(engine)
        return texts, ran_ahead

    expected = summary(run_all(sync_engine, requests))
    assert summary(run_all(async_engine, requests)) == expected
    assert expected["eos"][:2] == ([probe[:4]], ["stop"]) and expected["stop-id"][1] == ["stop"]
    assert expected["stop-str"][1] == ["stop"] and expected["n2"][2] == 14
    (async_texts, ran_ahead), (sync_texts, never) = run_with_text(async_engine), run_with_text(sync_engine)
    assert async_texts == sync_texts and ran_ahead > 3 and never == 0


def test_abort_while_a_step_is_in_flight(make_engine):
    engine = make_engine(async_scheduling=True)
    for i, prompt in enumerate(prompts()[2:]):
        engine.add_request(f"a{i}", prompt, greedy(max_tokens=40))
    for _ in range(4):
        engine.step()
    assert engine.pipeline.in_flight is not None
    out = engine.abort("a1")[-1]
    assert out.finished and out.samples[-1].finish_reason == "abort"
    assert all(t >= 0 for s in out.samples for t in s.token_ids)
    assert out.completion_tokens == 3  # three steps' tokens arrived; the in-flight one is dropped
    while engine.has_work:
        engine.step()
    assert_pool_free(engine)


def test_abort_frees_blocks(make_engine):
    engine = make_engine()
    for i, prompt in enumerate(prompts()[3:]):
        engine.add_request(f"x{i}", prompt, greedy(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.pool.num_blocks
    out = engine.abort("x1")[-1]
    assert out.request_id == "x1" and out.finished and out.samples[0].finish_reason == "abort"
    assert engine.abort("x1") == []  # idempotent
    for i in (0, 2):
        engine.abort(f"x{i}")
    assert_pool_free(engine)


def test_stop_token_and_stop_string(make_engine, reference):
    engine = make_engine()
    prompt, expected = prompts()[2], reference[2]
    stop_id = expected[4]
    first = expected.index(stop_id)
    out, (tokens,) = run_all(engine, {"s": (prompt, greedy(stop_token_ids=[stop_id]))})["s"]
    assert tokens == expected[: first + 1]
    assert out.samples[-1].finish_reason == "stop" and out.samples[-1].stop_reason == stop_id
    text = engine.tokenizer.decode(expected)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine.add_request("t", prompt, greedy(stop=[stop]))
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert_pool_free(engine)
    assert outputs[-1].samples[-1].finish_reason == "stop" and outputs[-1].samples[-1].stop_reason == stop
    text, full = "".join(s.text for o in outputs for s in o.samples), engine.tokenizer.decode(expected)
    assert text == full[: full.index(stop)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_min_tokens_defers_stop_tokens(make_engine, reference, async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    prompt, expected = prompts()[2], reference[2]
    stop_id = expected[0]  # greedy decoding would stop at once
    assert run_all(engine, {"s": (prompt, greedy(stop_token_ids=[stop_id]))})["s"][1] == [[stop_id]]
    params = greedy(stop_token_ids=[stop_id], min_tokens=4)
    out, (tokens,) = run_all(engine, {"m": (prompt, params)})["m"]
    assert len(tokens) >= 4 and stop_id not in tokens[:4]
    if out.samples[-1].finish_reason == "stop":
        assert tokens[-1] == stop_id and stop_id not in tokens[:-1]
    else:
        assert len(tokens) == MAX_TOKENS


def test_failing_step_fails_only_its_requests(make_engine, reference, monkeypatch):
    engine = make_engine()
    engine.add_request("doomed", prompts()[1], greedy())
    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "execute", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        outputs = engine.step()
    assert [o.request_id for o in outputs] == ["doomed"]
    assert outputs[0].finished and outputs[0].error == "RuntimeError: boom"
    assert outputs[0].samples[0].finish_reason == "error"
    assert_pool_free(engine)
    assert run_all(engine, {"ok": (prompts()[1], greedy())})["ok"][1] == [reference[1]]


def test_too_long_request_is_rejected(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidParameter, match=r"\+ max_tokens \(100\) > context") as error:
        engine.add_request("long", [1] * 2000, greedy(max_tokens=100))
    assert error.value.param == "max_tokens"
    with pytest.raises(InvalidParameter, match="the prompt is empty") as error:
        engine.add_request("empty", [], greedy())
    assert error.value.param == "prompt"
    assert not engine.requests


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_async_engine_streams_deltas_and_aborts(make_engine, reference, async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    async_engine = AsyncEngine(engine, "tiny")
    async_engine.start()

    async def main():
        deltas = []
        async for out in async_engine.add_requests({"s": prompts()[3]}, greedy()):
            deltas.append(out)
        stream = async_engine.add_requests({"cut": prompts()[4]}, greedy(max_tokens=500))
        async for _ in stream:
            break
        await stream.aclose()  # the consumer goes away: the request is aborted
        for _ in range(200):
            if not engine.requests:
                break
            await asyncio.sleep(0.01)
        await async_engine.shutdown(grace_seconds=1.0)
        return deltas

    deltas = asyncio.run(main())
    assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert [t for d in deltas for s in d.samples for t in s.token_ids] == reference[3]
    assert not async_engine.stats().loop_alive
    assert_pool_free(engine)


def test_async_engine_batch_shares_one_stream_and_starts_all_or_none(make_engine, reference):
    """The prompts of one HTTP request: all start or none, their outputs interleave in one stream, and
    closing it early aborts every one still running."""
    engine = make_engine(async_scheduling=True)
    async_engine = AsyncEngine(engine, "tiny")
    async_engine.start()

    async def main():
        with pytest.raises(ValueError, match="empty"):
            async_engine.add_requests({"ok": prompts()[1], "bad": []}, greedy())
        tokens: dict[str, list[int]] = {}
        order = []
        async for out in async_engine.add_requests({"a": prompts()[1], "b": prompts()[2]}, greedy()):
            tokens.setdefault(out.request_id, []).extend(t for s in out.samples for t in s.token_ids)
            order.append(out.request_id)
        stream = async_engine.add_requests({"c": prompts()[3], "d": prompts()[4]}, greedy(max_tokens=500))
        await anext(stream)
        await stream.aclose()
        for _ in range(200):
            if not engine.requests:
                break
            await asyncio.sleep(0.01)
        await async_engine.shutdown(grace_seconds=1.0)
        return tokens, order

    tokens, order = asyncio.run(main())
    assert tokens == {"a": reference[1], "b": reference[2]}
    assert order.index("b") < len(order) - order[::-1].index("a") - 1  # interleaved, not one after the other
    assert_pool_free(engine)


def test_engine_loop_survives_a_bug_outside_a_step(make_engine, reference, monkeypatch):
    """An exception escaping LLMEngine.step() (with a step in flight) fails the requests then in the
    engine with an error, frees their blocks, and the loop serves the next request normally."""
    engine = make_engine(async_scheduling=True)
    async_engine = AsyncEngine(engine, "tiny")
    real_step = engine.step
    calls = 0

    def flaky_step():
        nonlocal calls
        calls += 1
        outputs = real_step()
        if calls == 3:  # after launching a step whose tokens are not read yet
            assert engine.pipeline.in_flight is not None
            raise RuntimeError("bug in the loop")
        return outputs

    monkeypatch.setattr(engine, "step", flaky_step)
    async_engine.start()

    async def main():
        failed = [out async for out in async_engine.add_requests({"x": prompts()[2]}, greedy(max_tokens=40))]
        ok = [out async for out in async_engine.add_requests({"y": prompts()[3]}, greedy())]
        await async_engine.shutdown(grace_seconds=1.0)
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].finished and failed[-1].error == "RuntimeError: bug in the loop"
    assert failed[-1].samples[-1].finish_reason == "error"
    assert [t for d in ok for s in d.samples for t in s.token_ids] == reference[3]
    assert async_engine.last_error == "RuntimeError: bug in the loop"
    assert_pool_free(engine)


@pytest.mark.parametrize(
    ("max_num_seqs", "budget", "max_model_len", "variants"),
    [(256, 2048, 4096, [2, 4, 8, 16, 32, 64, 128, 256]), (5, 64, 4096, [2, 4]), (1, 16, 10, [])],
)
def test_warm_up_steps_cover_every_kernel_variant(max_num_seqs, budget, max_model_len, variants):
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    steps = warm_up_steps(config, max_model_len)
    # LeanAttention's BLOCK_B: one compiled variant per power of two of decodes in a step
    assert sorted({max(2, 1 << (len(s.decodes) - 1).bit_length()) for s in steps if s.decodes}) == variants
    chunks = [c for s in steps for c in s.prefills]
    assert any(c.num_tokens == min(budget, max_model_len) for c in chunks)
    assert any(c.num_tokens % 16 and c.num_tokens > 1 for c in chunks)  # Triton's "other" integer class
    assert any(c.seq.num_computed_tokens > 0 for c in chunks)  # a chunk after a cached prefix
    # scored prompts (echo): every position but the last of a whole chunk, and of a chunk of 37 tokens
    full = min(budget, max_model_len)
    assert sorted(c.num_scored for c in chunks if c.num_scored) == sorted({full - 1, min(37, full - 1) - 1})
    for step in steps:
        assert len(step.prefills) + len(step.decodes) <= max_num_seqs
        assert step.num_tokens <= budget
        for chunk in step.prefills:
            assert chunk.completes_prompt and len(chunk.seq.token_ids) <= max_model_len
        assert all(s.num_uncomputed == 1 for s in step.decodes)


def test_warm_up_leaves_requests_blocks_and_stats_alone(make_engine, reference):
    engine = make_engine(max_num_seqs=5, max_num_batched_tokens=64)
    first = run_all(engine, {"before": (prompts()[3], greedy())})
    cache = engine.runner.kv_cache.data[:, :, : engine.runner.scratch_block].clone()  # all but scratch
    stats_before = engine.stats()
    assert warm_up(engine.runner, engine.sampler, engine.config, engine.max_model_len) > 0
    torch.testing.assert_close(engine.runner.kv_cache.data[:, :, : engine.runner.scratch_block], cache)
    assert engine.stats() == stats_before
    assert_pool_free(engine)
    assert not engine.scheduler.has_work
    after = run_all(engine, {"after": (prompts()[3], greedy())})
    assert after["after"][1] == first["before"][1] == [reference[3]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager(make_engine):
    graph, eager = make_engine(), make_engine(enforce_eager=True)
    assert graph.runner._graphs and not eager.runner._graphs
    requests = {f"g{i}": (p, greedy(max_tokens=24)) for i, p in enumerate(prompts(seed=1))}
    a, b = run_all(graph, requests), run_all(eager, requests)
    assert {k: v[1] for k, v in a.items()} == {k: v[1] for k, v in b.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_with_l2_prefetch_match_plain_graphs(make_engine, monkeypatch):
    """Small decode steps replay graphs that prefetch the o projection into L2 on a side stream (Hopper):
    same tokens as graphs without it."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the L2 bulk prefetch is Hopper's")
    with_prefetch = make_engine(kv_cache_tokens=4112)  # an engine of its own (make_engine caches by settings)
    assert {bucket for bucket, prefetching in with_prefetch.runner._graphs if prefetching} == {1, 2, 4}
    with monkeypatch.context() as patch:
        patch.setattr(model_runner, "PREFETCH_MAX_BATCH", 0)
        plain = make_engine(kv_cache_tokens=4128)
    assert not any(prefetching for _, prefetching in plain.runner._graphs)
    chosen = []
    original = model_runner.prefetches
    monkeypatch.setattr(model_runner, "prefetches", lambda *a: chosen.append(original(*a)) or chosen[-1])
    requests = {f"p{i}": (p, greedy(max_tokens=24)) for i, p in enumerate(prompts(seed=2)[:3])}
    a, b = run_all(with_prefetch, requests), run_all(plain, requests)
    assert {k: v[1] for k, v in a.items()} == {k: v[1] for k, v in b.items()}
    assert True in chosen
