"""Build a CausalLM from a Hugging Face directory: weights from safetensors (sharded or not, with a
progress bar) copied into the fused parameters on the target device, or random weights from
`config.json` alone (`load_format="dummy"`, for benchmarks at real shapes); and the `--dtype` choice.
Under tensor parallelism each rank reads only its slices of the sharded matrices."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from leanserve.models.config import ModelConfig
from leanserve.models.layers import cpu_has_native_bf16
from leanserve.models.llama import CausalLM
from leanserve.models.parallel import TensorParallel

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Checkpoint tensors that are not weights of ours (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
) -> CausalLM:
    """The model of `model_dir` (config.json + *.safetensors) in `dtype` on `device`, in eval mode;
    with `tp`, this rank's shard of it."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    with torch.device(device):
        model = CausalLM(config, dtype, tp)
    if load_format == "dummy":
        _fill_random(model)
    elif load_format == "auto":
        _load_safetensors(model, model_dir)
    else:
        raise ValueError(f"unsupported load_format '{load_format}' (auto, dummy)")
    if model.device.type == "cuda" and dtype != torch.float32 and model.tp is None:
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
    total = sum(len(safe_open(f, framework="pt").keys()) for f in files)
    # disable=None: no bar when stderr is not a terminal (log pipelines, --log-format json, containers).
    bar = tqdm(total=total, desc=f"loading {model_dir.name}", unit="tensor", leave=False, disable=None)
    with bar as progress:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    progress.update()
                    if name not in layout:
                        if not name.endswith(_IGNORED_SUFFIXES) and not (
                            name == "lm_head.weight" and model.config.tie_word_embeddings
                        ):
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
                    target.copy_(tensor)
                    missing.discard(name)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )


def _read_slice(f, name: str, dim: int, start: int, end: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, end) of a checkpoint tensor, read without the rest."""
    view = f.get_slice(name)
    return view[start:end] if dim == 0 else view[:, start:end]


def _fill_random(model: CausalLM, seed: int = 0) -> None:
    """Random weights made on the device: N(0, 0.02) matrices, unit norm weights, zero biases."""
    generator = torch.Generator(device=model.embed_weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
