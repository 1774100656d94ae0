"""Build a CausalLM from a Hugging Face directory: weights from safetensors (sharded or not, with a
progress bar) copied into the fused parameters on the target device, or random weights from
`config.json` alone (`load_format="dummy"`, for benchmarks at real shapes); and the `--dtype` choice.
Under tensor parallelism each rank reads only its slices of the sharded matrices. With FP8 linear weights
(`--quantization`, models/quantization.py) an FP8 checkpoint tensor is copied with its scales (one per
tensor or row; block-wise ones are dequantized and the weight requantized per row) and a dense one is
quantized per row on the device; a dense model dequantizes an FP8 checkpoint's tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from leanserve.kernels.fp8 import FP8, dequantize, quantize_rows
from leanserve.models.config import ModelConfig
from leanserve.models.layers import cpu_has_native_bf16
from leanserve.models.llama import CausalLM
from leanserve.models.parallel import TensorParallel
from leanserve.models.quantization import use_fp8

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Checkpoint tensors that are not weights of ours: recomputed buffers; the static activation and KV-cache
# scales of FP8 checkpoints (the W8A8 products scale activations per row, the fp8 KV cache each written
# row: both on the fly).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "input_scale", "output_scale", "self_attn.k_scale",
                     "self_attn.v_scale", "self_attn.q_scale")  # fmt: skip
# An FP8 checkpoint tensor `<module>.weight`'s scales: one per tensor, per output row ([N] or [N, 1]) or
# per block ([ceil(N / rows), ceil(K / columns)]), the block-wise plain layout's named `_scale_inv`.
_SCALE_SUFFIX = "_scale"
_SCALE_SUFFIXES = (_SCALE_SUFFIX, "_scale_inv")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`--dtype` value -> torch dtype. "auto" is bf16 on GPU and the measured fastest on CPU: bf16 where
    oneDNN has native bf16 (1.7-1.8x faster than fp32, docs/cpu_dtype.md), fp32 elsewhere (AVX2 only)."""
    if name == "auto":
        on_gpu = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu or cpu_has_native_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype '{name}' (auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    tp: TensorParallel | None = None,
    quantization: str = "auto",
) -> CausalLM:
    """The model of `model_dir` (config.json + *.safetensors) in `dtype` on `device`, in eval mode;
    with `tp`, this rank's shard of it; its linear weights in FP8 where `quantization` says so
    (models.quantization.use_fp8: "auto" follows the checkpoint, "fp8" quantizes a dense one)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    fp8 = use_fp8(quantization, config.quantization)
    with torch.device(device):
        model = CausalLM(config, dtype, tp, fp8)
    if load_format == "dummy":
        _fill_random(model)
    elif load_format == "auto":
        _load_safetensors(model, model_dir)
    else:
        raise ValueError(f"unsupported load_format '{load_format}' (auto, dummy)")
    if model.device.type == "cuda" and dtype != torch.float32 and model.tp is None and not fp8:
        with torch.no_grad():
            for layer in model.layers:
                layer.fold_post_attention_norm()  # the skinny decode products then hold that norm
    return model.eval()


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir} (use load_format='dummy' for random)"
        )
    return files


def _load_safetensors(model: CausalLM, model_dir: Path) -> None:
    layout = model.checkpoint_layout()
    params = dict(model.named_parameters())
    missing = set(layout)
    files = _safetensors_files(model_dir)
    scales = _read_scales(files, layout) if model.config.quantization else {}
    block = model.config.fp8_block
    if block is not None:
        logger.info("block-wise FP8 checkpoint (%dx%d scales): each weight is requantized with one scale a "
                    "row, which rounds it once more", *block)  # fmt: skip
    total = sum(len(safe_open(f, framework="pt").keys()) for f in files)
    # disable=None: no bar when stderr is not a terminal (log pipelines, --log-format json, containers).
    bar = tqdm(total=total, desc=f"loading {model_dir.name}", unit="tensor", leave=False, disable=None)
    with bar as progress:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    progress.update()
                    if name not in layout:
                        tied_head = name == "lm_head.weight" and model.config.tie_word_embeddings
                        if not (name.endswith(_IGNORED_SUFFIXES) or tied_head or name in scales):
                            logger.warning("ignoring unexpected checkpoint tensor %s", name)
                        continue
                    param_name, lo, hi, shard = layout[name]
                    target = params[param_name].data[lo:hi]
                    tensor = f.get_tensor(name) if shard is None else _read_slice(f, name, *shard)
                    # A tensor of one row's shape (q_norm/k_norm) is broadcast over the rows.
                    if tensor.shape not in (target.shape, target.shape[1:]):
                        raise ValueError(
                            f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit {param_name}"
                        )
                    tensor = tensor.to(target.device)
                    scale = _tensor_scale(scales, name, tensor, shard, block)
                    _copy_weight(params, param_name, lo, hi, tensor, scale)
                    missing.discard(name)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )


def _read_scales(files: list[Path], layout: dict) -> dict[str, torch.Tensor]:
    """Every scale tensor of a weight in `layout` (`_SCALE_SUFFIXES`), as fp32 (small: one per tensor,
    row or block)."""
    scales = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if any(name.endswith(s) and name.removesuffix(s) in layout for s in _SCALE_SUFFIXES):
                    scales[name] = f.get_tensor(name).float()
    return scales


def _tensor_scale(
    scales: dict[str, torch.Tensor],
    name: str,
    tensor: torch.Tensor,
    shard: tuple[int, int, int] | None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """An FP8 checkpoint tensor's scales as [rows of `tensor`] fp32 (a per-tensor scale repeated, this
    rank's rows of per-row ones), or with `block` as one scale per element of `tensor` (its blocks'
    scales, for this rank's slice); None for a dense tensor. ValueError for an FP8 tensor we cannot
    read."""
    if not tensor.dtype.is_floating_point or tensor.element_size() != 1:
        return None
    if tensor.dtype != FP8:
        raise ValueError(f"{name}: unsupported checkpoint dtype {tensor.dtype} (FP8 weights are e4m3)")
    scale = next((scales[name + s] for s in _SCALE_SUFFIXES if name + s in scales), None)
    if scale is None:
        raise ValueError(f"{name} is FP8 but the checkpoint has no {name}{_SCALE_SUFFIX}")
    if block is not None:
        return _block_scales(name, scale, tensor.shape, shard, block, tensor.device)
    scale = scale.reshape(-1)
    if scale.numel() == 1:
        return scale.expand(tensor.shape[0]).contiguous()
    if shard is not None and shard[0] == 0:
        scale = scale[shard[1] : shard[2]]
    if scale.numel() != tensor.shape[0]:
        raise ValueError(
            f"{name}{_SCALE_SUFFIX}: {scale.numel()} scales for {tensor.shape[0]} rows (per-tensor or "
            "per-output-channel scales only)"
        )
    return scale


def _block_scales(
    name: str,
    scale: torch.Tensor,
    shape: torch.Size,
    shard: tuple[int, int, int] | None,
    block: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """Block scales [ceil(N / rows), ceil(K / columns)] spread over the elements of a tensor of `shape`
    (this rank's `shard` of the checkpoint tensor) on `device`: [shape] fp32, expanded there rather than
    copied there."""
    offsets = [0, 0]
    if shard is not None:
        offsets[shard[0]] = shard[1]
    last = [(n - 1 + offset) // b for n, offset, b in zip(shape, offsets, block, strict=True)]
    if scale.dim() != 2 or last[0] >= scale.shape[0] or last[1] >= scale.shape[1]:
        raise ValueError(
            f"{name}: block scales of shape {tuple(scale.shape)} do not cover the weight in "
            f"{block[0]}x{block[1]} blocks"
        )
    rows, cols = ((torch.arange(n, device=device) + offset) // b
                  for n, offset, b in zip(shape, offsets, block, strict=True))  # fmt: skip
    return scale.to(device)[rows][:, cols]


def _copy_weight(
    params: dict[str, torch.nn.Parameter],
    param_name: str,
    lo: int,
    hi: int,
    tensor: torch.Tensor,
    scale: torch.Tensor | None,
) -> None:
    """Rows [lo, hi) of a parameter from a checkpoint tensor on its device, FP8 (with per-row `scale`) or
    dense: an FP8 parameter takes FP8 as it is and quantizes a dense tensor per row; a dense parameter
    takes a dense tensor as it is and dequantizes FP8. Block-wise FP8 (a `scale` per element) is
    dequantized in fp32 first, then taken as a dense tensor."""
    param = params[param_name]
    if scale is not None and scale.dim() == 2:
        tensor, scale = tensor.float() * scale, None
    if param.dtype == FP8:
        weight, scale = (tensor, scale.to(tensor.device)) if scale is not None else quantize_rows(tensor)
        param.data[lo:hi].copy_(weight)
        params[param_name + _SCALE_SUFFIX].data[lo:hi].copy_(scale)
    elif scale is not None:
        param.data[lo:hi].copy_(dequantize(tensor, scale.to(tensor.device), param.dtype))
    else:
        param.data[lo:hi].copy_(tensor)


def _read_slice(f, name: str, dim: int, start: int, end: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, end) of a checkpoint tensor, read without the rest."""
    view = f.get_slice(name)
    return view[start:end] if dim == 0 else view[:, start:end]


def _fill_random(model: CausalLM, seed: int = 0) -> None:
    """Random weights made on the device: N(0, 0.02) matrices (FP8 ones drawn in the model dtype and
    quantized per row), unit norm weights, zero biases."""
    generator = torch.Generator(device=model.embed_weight.device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name.endswith(_SCALE_SUFFIX):
            continue  # filled with its weight
        if param.dtype == FP8:
            dense = torch.empty(param.shape, dtype=model.dtype, device=param.device)
            _copy_weight(params, name, 0, param.shape[0], dense.normal_(0.0, 0.02, generator=generator), None)
        elif "norm" in name:
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
