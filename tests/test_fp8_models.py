"""FP8 models on CPU (the dequantizing reference path): quantize-at-load against the dense model (greedy
agreement over the first 64 tokens of a fixed prompt set, and the chosen tokens' log-probabilities), FP8
checkpoints in the compressed-tensors and plain fp8 layouts written here, the quantization_config
schemes we refuse, the `quantization` option, and the engine serving the embedded model in FP8."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from greedy_runner import GreedyRunner, Seq
from safetensors.torch import load_file, save_file

from leanserve.kernels.fp8 import FP8, FP8_MAX, dequantize, quantize_rows, quantize_with
from leanserve.models.config import ModelConfig
from leanserve.models.layers import prepack_linear_weights
from leanserve.models.loader import load_model
from leanserve.models.parallel import TensorParallel
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

PROMPTS = [
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "The three primary colors are",
    "Q: What is the boiling point of water?\nA:",
]
NEW_TOKENS = 64
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _encode(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def _logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-probabilities [len(tokens), vocab] of the positions that predict `tokens` after `prompt`
    (teacher-forced, one prefill)."""
    seq = prompt + tokens
    hidden = GreedyRunner(model).step([(Seq(list(seq), len(seq)), len(seq))], [])
    with torch.inference_mode():
        return model.compute_logits(hidden[len(prompt) - 1 : -1]).log_softmax(-1)


def _agreement(dense, fp8, prompts: list[list[int]]) -> tuple[float, float]:
    """Over the dense model's first NEW_TOKENS greedy tokens of each prompt: the share FP8 picks too
    (its greedy choice at each position of the dense continuation, so one early difference does not
    decide the rest), and the mean |delta logprob| of those tokens between the two."""
    want = GreedyRunner(dense).generate(prompts, new_tokens=NEW_TOKENS)
    same, deltas = 0, []
    for prompt, tokens in zip(prompts, want, strict=True):
        ids = torch.tensor(tokens)[:, None]
        ours, theirs = _logprobs(fp8, prompt, tokens), _logprobs(dense, prompt, tokens)
        same += int((ours.argmax(-1) == ids[:, 0]).sum())
        deltas.append((ours.gather(1, ids) - theirs.gather(1, ids)).abs())
    return same / (len(prompts) * NEW_TOKENS), torch.cat(deltas).mean().item()


@pytest.mark.slow
def test_embedded_model_fp8_greedy_agrees_with_dense(default_model_path):
    """The real weights: FP8 (quantized at load) against the fp32 model, both as the CPU engine serves
    them (prepacked: the FP8 weights dequantized once; the tiny models check that this changes nothing)."""
    dense = load_model(default_model_path, torch.float32, "cpu")
    fp8 = load_model(default_model_path, torch.float32, "cpu", quantization="fp8")
    assert fp8.layers[0].mlp.down_weight.dtype == FP8 and fp8.lm_head_weight.dtype == torch.float32
    prepack_linear_weights(dense)
    prepack_linear_weights(fp8)
    agree, delta = _agreement(dense, fp8, _encode(default_model_path))
    print(f"embedded: fp8 vs fp32 greedy agreement {agree:.1%}, mean |delta logprob| {delta:.4f}")
    assert agree >= 0.9
    assert 0 < delta < 0.15  # FP8 moved the log-probabilities, a little (0.079 here)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])  # untied LM head; qkv bias
def test_tiny_fp8_model_computes_its_dequantized_weights(kind, tiny_model_factory):
    """The tiny random models' FP8 forward is exactly the dense forward of the dequantized weights (the
    CPU path's products), through chunked prefill and batched decode. Their agreement with the dense
    model is printed, not asserted: weights scaled up so that greedy decoding is not degenerate give
    near-flat distributions (top token ~5% likely) that FP8's ~2.6% weight error reorders."""
    path = tiny_model_factory(kind)
    dense = load_model(path, torch.float32, "cpu")
    fp8 = load_model(path, torch.float32, "cpu", quantization="fp8")
    dequantized = load_model(path, torch.float32, "cpu")
    fp8_params = dict(fp8.named_parameters())
    with torch.no_grad():
        for name, param in dequantized.named_parameters():
            if fp8_params[name].dtype == FP8:
                param.copy_(dequantize(fp8_params[name], fp8_params[f"{name}_scale"], torch.float32))
    prompts = _encode(path)
    tokens = _greedy(fp8, prompts)
    assert tokens == _greedy(dequantized, prompts)
    agree, delta = _agreement(dense, fp8, prompts)
    print(f"{kind}: fp8 vs fp32 greedy agreement {agree:.1%}, mean |delta logprob| {delta:.4f}")
    assert delta > 0  # the weights are quantized
    prepack_linear_weights(fp8)  # as the CPU engine serves it: dequantized once
    assert fp8.layers[0].attn.qkv_weight_scale is None
    assert _greedy(fp8, prompts) == tokens


# -- FP8 checkpoints --------------------------------------------------------------------------------
def _rewrite_linear_weights(src, out, section: dict, quantize) -> dict[str, torch.Tensor]:
    """Copy the dense checkpoint in `src` to `out` with `section` as its quantization_config and each
    linear weight w (fp32) replaced by the tensors of quantize(name, w) -> (tensors by name, a value to
    return). Returns those values by weight name."""
    shutil.copytree(src, out, dirs_exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    returned = {}
    for name in list(tensors):
        if name.endswith(tuple(f"{p}.weight" for p in LINEAR)):
            written, returned[name] = quantize(name, tensors.pop(name).float())
            tensors |= written
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = section
    (out / "config.json").write_text(json.dumps(config))
    return returned


def _write_fp8_checkpoint(src, out, layout: str) -> dict[str, torch.Tensor]:
    """Copy the dense checkpoint in `src` to `out` with its linear weights in FP8: "compressed-tensors"
    with per-channel scales [N, 1] (quantize_rows'), or "fp8" with one scale per tensor (and a static
    input scale, which we ignore). Returns the FP8 tensors written."""

    def quantize(name: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if layout == "compressed-tensors":
            q, scale = quantize_rows(w)
            return {name: q, f"{name}_scale": scale[:, None]}, q
        scale = (w.abs().max() / FP8_MAX).reshape(())
        q = quantize_with(w, scale.expand(w.shape[0]))
        written = {
            name: q,
            f"{name}_scale": scale,
            name.replace(".weight", ".input_scale"): torch.tensor(0.05),
        }
        if name.endswith("v_proj.weight"):  # a static KV-cache scheme's scales, which we ignore too
            for kv in "kv":
                written[name.replace("v_proj.weight", f"{kv}_scale")] = torch.tensor(0.1)
        return written, q

    return _rewrite_linear_weights(src, out, _section(layout), quantize)


def _section(layout: str, strategy: str = "channel") -> dict:
    if layout == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    activations = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}
        },
        "ignore": ["lm_head"],
    }


def _greedy(model, prompts) -> list[list[int]]:
    return GreedyRunner(model).generate(prompts, new_tokens=16, chunk=5, stagger=1)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])  # untied LM head; qkv bias
def test_compressed_tensors_checkpoint_equals_quantize_at_load(kind, tiny_model_factory, tmp_path):
    src = tiny_model_factory(kind)
    _write_fp8_checkpoint(src, tmp_path, "compressed-tensors")
    assert ModelConfig.from_dir(tmp_path).quantization == "fp8"
    stored = load_model(tmp_path, torch.float32, "cpu")  # "auto": as the checkpoint stores them
    at_load = load_model(src, torch.float32, "cpu", quantization="fp8")
    a, b = dict(stored.named_parameters()), dict(at_load.named_parameters())
    assert a.keys() == b.keys()
    for name, param in a.items():
        assert param.dtype == b[name].dtype, name
        assert torch.equal(param.view(torch.uint8) if param.dtype == FP8 else param,
                           b[name].view(torch.uint8) if param.dtype == FP8 else b[name]), name  # fmt: skip
    prompts = _encode(src)
    assert _greedy(stored, prompts) == _greedy(at_load, prompts)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # tied LM head; q/k norm
def test_per_tensor_fp8_checkpoint_broadcasts_each_parts_scale(kind, tiny_model_factory, tmp_path, caplog):
    """The plain fp8 layout: a scale per q/k/v (gate/up) tensor becomes per-row scales of the fused
    weight; the model computes what the same checkpoint dequantized into a dense model computes. Its
    static activation and KV-cache scales are left out without a warning each."""
    src = tiny_model_factory(kind)
    written = _write_fp8_checkpoint(src, tmp_path, "fp8")
    with caplog.at_level(logging.WARNING, logger="leanserve.models.loader"):
        model = load_model(tmp_path, torch.float32, "cpu")
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]
    raw = load_file(tmp_path / "model.safetensors")
    attn = model.layers[1].attn
    q_rows = attn.num_heads * attn.head_dim
    k_name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(
        attn.qkv_weight_scale[:q_rows], raw["model.layers.1.self_attn.q_proj.weight_scale"].expand(q_rows)
    )
    k_rows = attn.qkv_weight[q_rows : q_rows + attn.num_kv_heads * attn.head_dim]
    assert torch.equal(k_rows.view(torch.uint8), written[k_name].view(torch.uint8))
    dense = load_model(tmp_path, torch.float32, "cpu", quantization="none")
    assert dense.layers[1].attn.qkv_weight.dtype == torch.float32
    torch.testing.assert_close(
        dense.layers[1].attn.qkv_weight[q_rows : q_rows + k_rows.shape[0]],
        dequantize(written[k_name], raw[f"{k_name}_scale"].expand(k_rows.shape[0]), torch.float32),
    )
    prompts = _encode(src)
    assert _greedy(model, prompts) == _greedy(dense, prompts)


def _write_block_fp8_checkpoint(src, out, layout: str, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Copy the dense checkpoint in `src` to `out` with its linear weights in block-wise FP8, as Qwen3-FP8
    ("fp8": `weight_scale_inv`) or llm-compressor's block scheme ("compressed-tensors": `weight_scale`)
    store them: a scale per `block` of W (edge blocks ragged). Returns the weights' dequantized values."""

    def quantize(name: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows, cols = (torch.arange(n) // b for n, b in zip(w.shape, block, strict=True))
        padded = torch.zeros(int(rows[-1] + 1) * block[0], int(cols[-1] + 1) * block[1])
        padded[: w.shape[0], : w.shape[1]] = w.abs()
        amax = padded.view(int(rows[-1] + 1), block[0], int(cols[-1] + 1), block[1]).amax(dim=(1, 3))
        scales = amax / FP8_MAX
        # Unequal magnitudes between blocks, so that the requantization per row has work to do.
        scales[::2] *= 3.0
        per_element = scales[rows][:, cols]
        q = (w / per_element).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        suffix = "_scale_inv" if layout == "fp8" else "_scale"
        return {name: q, name + suffix: scales}, q.float() * per_element

    if layout == "fp8":
        section = {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic"}
    else:
        section = _section("compressed-tensors", strategy="block")
        section["config_groups"]["group_0"]["weights"]["block_structure"] = list(block)
    return _rewrite_linear_weights(src, out, section, quantize)


@pytest.mark.parametrize("layout", ["fp8", "compressed-tensors"])
def test_block_wise_fp8_checkpoint_is_requantized_per_row(layout, tiny_model_factory, tmp_path):
    """Block-wise FP8 (Qwen3-FP8, DeepSeek; llm-compressor's block scheme), in blocks that do not divide
    the tiny model's matrices: loaded as FP8 it holds what quantizing its dequantized weights per row at
    load gives, bit for bit; loaded dense (quantization none) it holds the dequantized weights."""
    src = tiny_model_factory("llama3")
    checkpoint, dequantized = tmp_path / "block", tmp_path / "dense"
    values = _write_block_fp8_checkpoint(src, checkpoint, layout, (32, 48))
    assert ModelConfig.from_dir(checkpoint).fp8_block == (32, 48)
    shutil.copytree(src, dequantized)
    save_file(load_file(src / "model.safetensors") | values, dequantized / "model.safetensors")
    stored = load_model(checkpoint, torch.float32, "cpu")
    at_load = load_model(dequantized, torch.float32, "cpu", quantization="fp8")
    a, b = dict(stored.named_parameters()), dict(at_load.named_parameters())
    assert stored.layers[0].mlp.down_weight.dtype == FP8
    for name, param in a.items():
        assert torch.equal(param.view(torch.uint8) if param.dtype == FP8 else param,
                           b[name].view(torch.uint8) if param.dtype == FP8 else b[name]), name  # fmt: skip
    dense = load_model(checkpoint, torch.float32, "cpu", quantization="none")
    want = load_model(dequantized, torch.float32, "cpu")
    for name, param in dict(dense.named_parameters()).items():
        assert torch.equal(param, dict(want.named_parameters())[name]), name
    # Each rank reads the scales of its own rows or columns.
    shards = [
        load_model(checkpoint, torch.float32, "cpu", tp=TensorParallel(r, 2), quantization="none")
        for r in range(2)
    ]
    inter = want.config.intermediate_size
    down = torch.cat([shard.layers[0].mlp.down_weight for shard in shards], dim=1)
    assert torch.equal(down, want.layers[0].mlp.down_weight)
    gate_up = torch.cat([shard.layers[0].mlp.gate_up_weight.view(2, inter // 2, -1) for shard in shards], 1)
    assert torch.equal(gate_up.flatten(0, 1), want.layers[0].mlp.gate_up_weight)


def test_block_scales_that_miss_the_weight_are_an_error(tiny_model_path, tmp_path):
    _write_block_fp8_checkpoint(tiny_model_path, tmp_path, "fp8", (32, 48))
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj\.weight: block scales of shape"):
        load_model(tmp_path, torch.float32, "cpu")


def test_ranks_read_their_rows_of_the_scales(tiny_model_factory, tmp_path):
    """Tensor parallelism: the per-channel scales of row-split weights (q/k/v, gate/up) are sliced with
    their rows; column-split weights (o, down) keep every row, so each rank holds the whole scale."""
    _write_fp8_checkpoint(tiny_model_factory("llama3"), tmp_path, "compressed-tensors")
    full = load_model(tmp_path, torch.float32, "cpu")
    shards = [load_model(tmp_path, torch.float32, "cpu", tp=TensorParallel(r, 2)) for r in range(2)]
    cfg = full.config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for ours, theirs in zip(full.layers, zip(*(s.layers for s in shards), strict=True), strict=True):
        scales = [t.attn.qkv_weight_scale for t in theirs]
        for start, size, local in ((0, q, 0), (q, kv, q // 2), (q + kv, kv, q // 2 + kv // 2)):
            parts = [s[local : local + size // 2] for s in scales]
            assert torch.equal(torch.cat(parts), ours.attn.qkv_weight_scale[start : start + size])
        gate_up = [t.mlp.gate_up_weight_scale.view(2, inter // 2) for t in theirs]
        assert torch.equal(torch.cat(gate_up, dim=1).flatten(), ours.mlp.gate_up_weight_scale)
        for shard in theirs:
            assert torch.equal(shard.attn.o_weight_scale, ours.attn.o_weight_scale)
            assert torch.equal(shard.mlp.down_weight_scale, ours.mlp.down_weight_scale)
        down = torch.cat([t.mlp.down_weight.view(torch.uint8) for t in theirs], dim=1)
        assert torch.equal(down, ours.mlp.down_weight.view(torch.uint8))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size \[128\]"),
        ({"quant_method": "fp8", "weight_block_size": [0, 128]}, r"weight_block_size \[0, 128\]"),
        ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme 'weird'"),
        (_section("compressed-tensors", strategy="block"), "block_structure in group_0 None"),
        (_section("compressed-tensors", strategy="group"), "strategy=group"),
        ({**_section("compressed-tensors"), "format": "pack-quantized"}, "format 'pack-quantized'"),
        ({"quant_method": "compressed-tensors", "config_groups": {}}, "no config_groups"),
    ],
)
def test_unknown_schemes_are_refused(section, message, tiny_model_path, tmp_path):
    shutil.copytree(tiny_model_path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tiny_model_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": section}))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path, torch.float32, "cpu")


def test_int8_compressed_tensors_weights_are_refused():
    section = _section("compressed-tensors")
    section["config_groups"]["group_0"]["weights"].update(type="int")
    with pytest.raises(ValueError, match="type=int"):
        ModelConfig.from_dict(_llama_dict() | {"quantization_config": section})


def test_fp8_tensor_without_its_scale_is_an_error(tiny_model_path, tmp_path):
    _write_fp8_checkpoint(tiny_model_path, tmp_path, "compressed-tensors")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj\.weight is FP8 but the checkpoint has no"):
        load_model(tmp_path, torch.float32, "cpu")


def _llama_dict() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }


# -- the option and the engine ----------------------------------------------------------------------
def test_bad_quantization_values_are_refused(tiny_model_path):
    with pytest.raises(ValueError, match="unsupported quantization 'int4'"):
        load_model(tiny_model_path, torch.float32, "cpu", quantization="int4")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")


def test_dummy_fp8_weights(tiny_model_path):
    model = load_model(tiny_model_path, torch.bfloat16, "cpu", load_format="dummy", quantization="fp8")
    mlp = model.layers[0].mlp
    assert mlp.gate_up_weight.dtype == FP8 and torch.all(mlp.gate_up_weight_scale > 0)
    # N(0, 0.02) rows: the scales are each row's largest magnitude over 448.
    assert 0.02 < mlp.gate_up_weight_scale.max().item() * FP8_MAX < 0.2


def test_engine_serves_embedded_model_in_fp8(default_model_path):
    engine = LLMEngine.from_config(
        EngineConfig(device="cpu", quantization="fp8", kv_cache_tokens=1024, max_num_seqs=4)
    )
    model = engine.runner.model
    assert model.fp8
    prompt = _encode(default_model_path)[0]
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens = []
    while engine.has_work:
        for out in engine.step():
            tokens += [t for s in out.samples for t in s.token_ids]
    reference = load_model(default_model_path, model.dtype, "cpu", quantization="fp8")
    prepack_linear_weights(reference)
    assert tokens == GreedyRunner(reference).generate([prompt], new_tokens=8)[0]
