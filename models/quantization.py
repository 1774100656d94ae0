"""Weight quantization: the `--quantization` choice, and the `quantization_config` section of FP8
checkpoints' config.json. Two layouts are read, both float8 e4m3 linear weights with fp32 scales:
compressed-tensors (llm-compressor's FP8 and FP8-dynamic schemes, and its block scheme) and the plain
`quant_method: fp8` one (AutoFP8 / vLLM, and the block-wise checkpoints of Qwen3-FP8 and DeepSeek with
`weight_block_size`). Scales cover a tensor, an output channel (`<module>.weight_scale`) or a block of
the weight (`weight_scale`, or `weight_scale_inv` in the plain layout: a multiplier despite the name);
the loader turns block scales into per-row ones (models/loader.py). Anything else (group scales, integer
or 4-bit weights) is refused with a ValueError naming it."""

from __future__ import annotations

from typing import Any

QUANTIZATIONS = ("auto", "none", "fp8")


def checkpoint_quantization(raw: dict[str, Any]) -> str | None:
    """How a config.json's checkpoint stores its linear weights: "fp8" (in a layout we read) or None
    (dense); ValueError for any other quantization."""
    section = raw.get("quantization_config")
    if not section:
        return None
    method = section.get("quant_method")
    if method == "compressed-tensors":
        _check_compressed_tensors(section)
    elif method == "fp8":
        _check_plain_fp8(section)
    else:
        raise ValueError(
            f"unsupported quantization_config quant_method '{method}' (leanserve reads FP8 checkpoints "
            "in the compressed-tensors and fp8 layouts)"
        )
    return "fp8"


def fp8_block_size(raw: dict[str, Any]) -> tuple[int, int] | None:
    """The (rows, columns) of W that one scale covers in a block-wise FP8 checkpoint; None for per-tensor
    or per-channel scales and for dense checkpoints. Call after `checkpoint_quantization` accepted it."""
    section = raw.get("quantization_config") or {}
    if section.get("quant_method") == "fp8":
        block = section.get("weight_block_size")
    else:
        groups = (section.get("config_groups") or {}).values()
        block = next((g["weights"].get("block_structure") for g in groups
                      if (g.get("weights") or {}).get("strategy") == "block"), None)  # fmt: skip
    return None if block is None else (int(block[0]), int(block[1]))


def _check_block(block: Any, where: str) -> None:
    if not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(f"unsupported {where} {block!r}: two positive block sides (rows, columns)")


def use_fp8(quantization: str, checkpoint: str | None) -> bool:
    """Whether the linear weights are held in FP8: `quantization` "fp8" (a dense checkpoint is quantized
    at load), "auto" (as the checkpoint stores them) or "none" (an FP8 checkpoint is dequantized)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization '{quantization}' ({', '.join(QUANTIZATIONS)})")
    return quantization == "fp8" or (quantization == "auto" and checkpoint == "fp8")


def _check_compressed_tensors(section: dict[str, Any]) -> None:
    fmt = section.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise ValueError(f"unsupported compressed-tensors format '{fmt}' (float-quantized FP8 only)")
    groups = section.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    for name, group in groups.items():
        weights = group.get("weights") or {}
        scheme = (weights.get("num_bits"), weights.get("type"), weights.get("strategy"))
        if scheme[:2] != (8, "float") or scheme[2] not in ("channel", "tensor", "block"):
            raise ValueError(
                f"unsupported compressed-tensors weight scheme in {name}: num_bits={scheme[0]}, "
                f"type={scheme[1]}, strategy={scheme[2]} (FP8 weights with channel, tensor or block scales)"
            )
        if scheme[2] == "block":
            _check_block(weights.get("block_structure"), f"block_structure in {name}")
        if weights.get("symmetric") is False:
            raise ValueError(f"unsupported asymmetric FP8 weights in compressed-tensors group {name}")
        activations = group.get("input_activations")
        if activations and (activations.get("num_bits"), activations.get("type")) != (8, "float"):
            raise ValueError(
                f"unsupported compressed-tensors input_activations in {name}: {activations.get('num_bits')}"
                f"-bit {activations.get('type')} (FP8 or none)"
            )


def _check_plain_fp8(section: dict[str, Any]) -> None:
    block = section.get("weight_block_size")
    if block is not None:
        _check_block(block, "weight_block_size")
    scheme = section.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"unsupported fp8 activation_scheme '{scheme}' (dynamic or static)")
    fmt = section.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"unsupported fp8 fmt '{fmt}' (e4m3 only)")
