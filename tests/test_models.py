"""Our Llama-family forward over the paged KV cache against HF transformers (fp32, CPU): greedy tokens
and logits, with prefill in one chunk or several, decode token by token, mixed prefill + decode steps
and batched decode of mixed lengths; plus loading (sharded, dummy, errors) and the attention timer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from greedy_runner import NEW_TOKENS, GreedyRunner, Seq

from leanserve.models import attention
from leanserve.models.attention import AttentionBatch, AttentionTimer
from leanserve.models.kv_cache import KVCache
from leanserve.models.layers import prepack_linear_weights
from leanserve.models.loader import load_model, resolve_dtype

PROMPTS = ["def fibonacci(n):", "Once upon a time, in a land far away, there lived a"]


def hf_greedy(model_dir, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """HF transformers' greedy continuation, EOS not treated specially (plain greedy, no processors)."""
    ids = torch.tensor([prompt_ids])
    out = _hf_model(model_dir).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
    )
    tokens = out[0, len(prompt_ids) :].tolist()
    assert len(tokens) == new_tokens  # generation did not stop early
    return tokens


_HF_MODELS: dict = {}


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF_MODELS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # our loop does not stop at EOS either
        _HF_MODELS[model_dir] = model
    return _HF_MODELS[model_dir]


def _encode(model_dir, prompts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module")
def loaded(tiny_model_factory):
    """kind -> (model dir, our fp32 CPU model, prompt ids, HF greedy continuations)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            path = tiny_model_factory(kind)
            prompts = _encode(path, PROMPTS)
            expected = [hf_greedy(path, p) for p in prompts]
            cache[kind] = (path, load_model(path, torch.float32, "cpu"), prompts, expected)
        return cache[kind]

    return get


KINDS = ["llama", "llama3", "qwen2", "qwen3"]
# (chunk, stagger, batched): whole prompts one sequence at a time; chunked prefill over cached prefix
# pages; all prompts together, joining two steps apart, so steps mix prefill chunks and decode tokens
# and decode batches hold sequences of different lengths.
MODES = {"one-chunk": (1 << 30, 0, False), "chunked": (3, 0, False), "batched-mixed": (3, 2, True)}
CASES = [(kind, mode) for kind in KINDS for mode in MODES if mode != "chunked"]  # chunked: the test below


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_greedy_matches_hf(loaded, kind, mode):
    chunk, stagger, batched = MODES[mode]
    _, model, prompts, expected = loaded(kind)
    if batched:
        got = GreedyRunner(model).generate(prompts, chunk=chunk, stagger=stagger)
    else:
        got = [GreedyRunner(model).generate([p], chunk=chunk)[0] for p in prompts]
    assert got == expected
    assert len({tuple(e) for e in expected}) > 1  # the continuations are not degenerate


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sdpa", [False, True], ids=["paged", "sdpa"])
def test_prefill_logits_match_hf(loaded, kind, sdpa, monkeypatch):
    """A whole prompt through SDPA per prompt (the default) and through the paged prefill path."""
    monkeypatch.setattr(attention, "SDPA_PREFILL", sdpa)
    path, model, prompts, _ = loaded(kind)
    prompt = prompts[1]
    runner = GreedyRunner(model)
    hidden = runner.step([(Seq(list(prompt), len(prompt)), len(prompt))], [])
    with torch.inference_mode():
        ours = model.compute_logits(hidden)
        theirs = _hf_model(path)(torch.tensor([prompt])).logits[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sdpa", [False, True], ids=["paged", "sdpa-split-at-prefix"])
def test_chunked_prefill_paths_match_hf(loaded, sdpa, monkeypatch):
    """Chunks after a cached prefix through the paged prefill path and through SDPA split at the prefix."""
    monkeypatch.setattr(attention, "SDPA_PREFILL", sdpa)
    _, model, prompts, expected = loaded("llama")
    chunk, _, _ = MODES["chunked"]
    assert [GreedyRunner(model).generate([p], chunk=chunk)[0] for p in prompts] == expected


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied lm_head; qkv bias
def test_prepacked_cpu_weights_change_nothing(loaded, kind):
    path, _, prompts, expected = loaded(kind)
    model = load_model(path, torch.float32, "cpu")
    prepack_linear_weights(model)
    assert model.layers[0].attn.qkv_weight.is_mkldnn and model.lm_head_weight.is_mkldnn
    assert not model.embed_weight.is_mkldnn  # the embedding is a lookup: it stays dense
    chunk, stagger, _ = MODES["batched-mixed"]
    assert GreedyRunner(model).generate(prompts, chunk=chunk, stagger=stagger) == expected

    dense, packed = (load_model(path, torch.bfloat16, "cpu") for _ in range(2))
    prepack_linear_weights(packed)
    prompt = prompts[1]
    logits = []
    for m in (dense, packed):
        hidden = GreedyRunner(m).step([(Seq(list(prompt), len(prompt)), len(prompt))], [])
        with torch.inference_mode():
            logits.append(m.compute_logits(hidden))
    torch.testing.assert_close(logits[1], logits[0])  # same oneDNN bf16 products, another weight layout


def test_mistral_logits_match_hf(tiny_model_factory, tmp_path):
    """Mistral is Llama under another name: the tiny Llama's weights under a Mistral config."""
    src = tiny_model_factory("llama")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path, torch.float32, "cpu")
    assert model.config.architecture == "MistralForCausalLM"
    prompt = _encode(tmp_path, PROMPTS[1:])[0]
    hidden = GreedyRunner(model).step([(Seq(list(prompt), len(prompt)), len(prompt))], [])
    with torch.inference_mode():
        theirs = _hf_model(tmp_path)(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(model.compute_logits(hidden), theirs, rtol=1e-4, atol=1e-4)
    assert type(_hf_model(tmp_path)).__name__ == "MistralForCausalLM"


def test_smollm2_greedy_matches_hf(default_model_path):
    model = load_model(default_model_path, torch.float32, "cpu")
    prompts = _encode(default_model_path, PROMPTS)
    expected = [hf_greedy(default_model_path, p) for p in prompts]
    assert GreedyRunner(model).generate(prompts, chunk=5, stagger=1) == expected


def test_sharded_checkpoint_loads_like_single_file(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("qwen2")
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    single, sharded = load_model(path, torch.float32, "cpu"), load_model(tmp_path, torch.float32, "cpu")
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_dummy_load_needs_only_config(tiny_model_factory, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_factory("llama3") / "config.json").read_text())
    model = load_model(tmp_path, torch.bfloat16, "cpu", load_format="dummy")
    assert model.embed_weight.dtype == torch.bfloat16
    tokens = GreedyRunner(model).generate([[1, 2, 3, 4, 5]], new_tokens=4)[0]
    assert len(tokens) == 4
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, torch.float32, "cpu")


def test_missing_tensor_is_an_error(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_factory("llama")
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="up_proj"):
        load_model(tmp_path, torch.float32, "cpu")


def test_wrong_shape_and_unknown_load_format_are_errors(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="load_format 'gguf'"):
        load_model(src, torch.float32, "cpu", load_format="gguf")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].t()
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"up_proj\.weight: checkpoint shape"):
        load_model(tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", "cuda", torch.bfloat16),
        ("float32", "cuda", torch.float32),
        ("bfloat16", "cpu", torch.bfloat16),
        ("float16", "cpu", torch.float16),
    ],
)
def test_resolve_dtype(name, device, expected):
    assert resolve_dtype(name, device) == expected


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native_bf16):
    # measured: docs/cpu_dtype.md; without native bf16 oneDNN cannot even lay out bf16 weights
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)


def test_bf16_model_prepacks_without_native_bf16(tiny_model_path, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model = load_model(tiny_model_path, torch.bfloat16, "cpu")
    prepack_linear_weights(model)  # bf16 weights stay dense instead of failing in oneDNN's reorder
    assert not any(buffer.is_mkldnn for buffer in model.buffers())


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")


def test_kv_cache_layout(tiny_model_factory):
    """Per layer K and V are [num_blocks, block_size, Hkv, D] views of one allocation, stored head-major:
    a head's block_size x D page of a block is contiguous, the block's heads one page after another."""
    model = load_model(tiny_model_factory("llama3"), torch.float32, "cpu", load_format="dummy")
    cache = KVCache(model.config, num_blocks=7, block_size=16, dtype=torch.bfloat16, device="cpu")
    cfg = model.config
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    for layer in range(cfg.num_layers):
        for kv, view in enumerate((cache.k[layer], cache.v[layer])):
            assert view.shape == (7, 16, hkv, d) and view.stride() == (hkv * 16 * d, d, 16 * d, 1)
            assert view.data_ptr() == cache.data[layer, kv].data_ptr()
            view[2, 5, 1] = 1.0 + layer + 2 * kv  # (block 2, slot 5, head 1) lands in head 1's page
            row = torch.full((d,), 1.0 + layer + 2 * kv, dtype=torch.bfloat16)
            assert torch.equal(cache.data[layer, kv, 2, 1, 5], row)
            assert torch.equal(view[2, :, 1], cache.data[layer, kv, 2, 1])
    assert int((cache.data != 0).sum()) == 2 * cfg.num_layers * d  # each write went to one row only
    total = cache.data.numel() * cache.data.element_size()
    assert KVCache.bytes_per_block(cfg, 16, torch.bfloat16) * 7 == total


def test_cpu_timer_splits_prefill_and_decode(loaded):
    _, model, prompts, _ = loaded("llama")
    timer = AttentionTimer(torch.device("cpu"), model.config.num_layers)
    runner = GreedyRunner(model, timer=timer)
    seq = Seq(list(prompts[0]), len(prompts[0]))
    runner.step([(seq, seq.prompt_len)], [])
    prefill, decode = timer.finish().seconds()
    assert prefill > 0 and decode == 0
    timer.start()
    seq.tokens.append(7)
    runner.step([], [seq])
    prefill, decode = timer.finish().seconds()
    assert prefill == 0 and decode > 0


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gpu_fp32_greedy_matches_hf(loaded, kind):
    """fp32 greedy output on a GPU equals HF's, with torch's products on cuBLASLt (set by load_model)."""
    path, _, prompts, expected = loaded(kind)
    model = load_model(path, torch.float32, "cuda")
    assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
    assert GreedyRunner(model).generate(prompts, chunk=3, stagger=2) == expected


@pytest.mark.gpu
@gpu
def test_gpu_decode_step_replays_in_cuda_graph_with_timer(tiny_model_factory):
    """The decode forward (Triton kernel included) captured once with AttentionBatch tensors as static
    buffers gives the eager result on every replay with new lengths, and its timer (the kernel's own
    stamps, reset inside the graph) reports each replay's attention time, close to what events around
    the same replay measure."""
    model = load_model(tiny_model_factory("llama3"), torch.bfloat16, "cuda")
    runner = GreedyRunner(model)
    seqs = [Seq(list(range(3, 3 + n)), n) for n in (5, 17, 30)]
    for seq in seqs:
        runner.step([(seq, seq.prompt_len)], [])
        seq.tokens.append(11)
    width = 16
    static = {
        "ids": torch.zeros(len(seqs), dtype=torch.int64, device="cuda"),
        "positions": torch.zeros(len(seqs), dtype=torch.int64, device="cuda"),
        "slots": torch.zeros(len(seqs), dtype=torch.int64, device="cuda"),
        "tables": torch.zeros(len(seqs), width, dtype=torch.int32, device="cuda"),
        "lens": torch.ones(len(seqs), dtype=torch.int32, device="cuda"),
    }
    timer = AttentionTimer(torch.device("cuda"), model.config.num_layers)

    def fill() -> None:
        slots = [runner._slots(s, 1)[0] for s in seqs]
        static["ids"].copy_(torch.tensor([s.tokens[s.num_cached] for s in seqs]))
        static["positions"].copy_(torch.tensor([s.num_cached for s in seqs]))
        static["slots"].copy_(torch.tensor(slots))
        static["tables"].copy_(torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs]))
        static["lens"].copy_(torch.tensor([s.num_cached + 1 for s in seqs]))

    none = torch.zeros(0, dtype=torch.int32, device="cuda")
    batch = AttentionBatch(
        slot_mapping=static["slots"],
        num_prefill_tokens=0,
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device="cuda"),
        prefill_context_lens=none,
        prefill_block_tables=none.view(0, width),
        decode_block_tables=static["tables"],
        decode_seq_lens=static["lens"],
        prefill_context_lens_host=[],
        prefill_query_lens_host=[],
    )

    def forward() -> torch.Tensor:
        return model(static["ids"], static["positions"], batch, runner.cache)

    with torch.inference_mode():
        fill()
        forward()  # warm-up: compiles the kernel and allocates its workspace
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        batch.timer = timer
        with torch.cuda.graph(graph):
            timer.start()
            hidden = forward()
        batch.timer = None
        for step in range(5):
            fill()
            eager = forward()
            replay = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            replay[0].record()
            graph.replay()
            replay[1].record()
            reading = timer.finish()
            torch.cuda.synchronize()
            # bf16 default tolerances: cuBLAS may pick other algorithms under capture.
            torch.testing.assert_close(hidden, eager)
            prefill_s, decode_s = reading.seconds()
            assert reading.decode_stamps.shape == (model.config.num_layers, 2)
            assert (reading.decode_stamps[:, 1] > reading.decode_stamps[:, 0]).all(), step
            assert prefill_s == 0 and 0 < decode_s < replay[0].elapsed_time(replay[1]) / 1e3, step
            for seq in seqs:
                seq.num_cached += 1
                seq.tokens.append(11 + step)
