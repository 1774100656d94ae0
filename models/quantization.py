"""Weight quantization: the `--quantization` choice, and the `quantization_config` section of FP8
checkpoints' config.json. Two layouts are read, both float8 e4m3 linear weights with fp32 scales per
tensor or per output channel in `<module>.weight_scale`: compressed-tensors (llm-compressor's FP8 and
FP8-dynamic schemes) and the plain `quant_method: fp8` one (AutoFP8 / vLLM). Anything else (block-wise
or group scales, integer or 4-bit weights) is refused with a ValueError naming it."""

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
        if scheme[:2] != (8, "float") or scheme[2] not in ("channel", "tensor"):
            raise ValueError(
                f"unsupported compressed-tensors weight scheme in {name}: num_bits={scheme[0]}, "
                f"type={scheme[1]}, strategy={scheme[2]} (FP8 weights with channel or tensor scales only)"
            )
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
        raise ValueError(
            f"unsupported block-wise FP8 (weight_block_size={block}): per-tensor or per-channel scales only"
        )
    scheme = section.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"unsupported fp8 activation_scheme '{scheme}' (dynamic or static)")
    fmt = section.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"unsupported fp8 fmt '{fmt}' (e4m3 only)")
