"""What Triton makes of LeanAttention's decode kernel for an H100 (sm_90), on any machine: no GPU needed.
For each cache (bf16; fp8 with V's pages [block_size, D], widened to fp16; fp8 with slot-major V pages,
multiplied in e4m3) and launch config it compiles the kernel as the launcher calls it
(Llama-3-8B heads: 32 query heads, 8 KV heads, D=128, 16-token pages, batch 1) and prints the registers
a thread holds, the bytes it spills, the shared memory a program takes, how many programs an SM then
holds at once, and the instruction mix of the main loop (the innermost loop around the tensor-core
products) read from the SASS. `--max-registers N` adds variants compiled under the register cap N
(Triton's `maxnreg`); `--dump DIR` writes each variant's TTGIR, PTX and SASS there.
`--tile N` overrides the launcher's tokens a tile.
Usage: python benchmarks/compile_sm90.py [--max-registers N ...] [--tile N] [--dump DIR]"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve.kernels import lean_attention
from leanserve.kernels.fp8 import FP8
from leanserve.kernels.lean_attention import LeanConfig, launch_config
from leanserve.models.kv_cache import slot_major

TARGET = GPUTarget("cuda", 90, 32)
SM_REGISTERS = 65536
SM_SHARED_BYTES = 232448  # an H100 SM's shared memory for thread blocks (227 KB)
_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    FP8: "fp8e4nv",
    torch.int32: "i32",
    torch.int64: "i64",
}
# Launch options among the launcher's keyword arguments; the rest are the kernel's constexprs.
_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


@dataclass
class Compiled:
    name: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    loop: Counter

    def programs_per_sm(self) -> int:
        """Programs an SM holds at once: registers (allocated in units of 8 a thread) and shared memory."""
        by_registers = SM_REGISTERS // (-(-self.registers // 8) * 8 * 32 * self.num_warps)
        return min(by_registers, SM_SHARED_BYTES // max(self.shared_bytes, 1))


class _Capture:
    """Stands in for the kernel: records the arguments of the launcher's call instead of launching."""

    def __init__(self, kernel: triton.JITFunction) -> None:
        self.kernel = kernel
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __getitem__(self, grid: tuple):
        def record(*args, **kwargs) -> None:
            self.args, self.kwargs = args, kwargs

        return record


CACHES = ("bf16", "fp8", "fp8 slot-major V")


def caches(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """K, V and the scales of a small cache of the benchmark's layout (the shapes that matter are the head
    counts, D and the page size; strides are runtime values): head-major pages as the engine's KVCache
    stores them, [block, Hkv, slot, D] seen as [block, slot, Hkv, D]; slot-major V pages [block, Hkv, D,
    slot] seen so too."""
    num_blocks, page, hkv, d = 4, 16, 8, 128
    dtype = torch.bfloat16 if kind == "bf16" else FP8
    k = torch.zeros(num_blocks, hkv, page, d, dtype=dtype).transpose(1, 2)
    v = slot_major(k) if kind == "fp8 slot-major V" else k.clone()
    scales = None if kind == "bf16" else torch.ones(num_blocks, hkv, page).transpose(1, 2)
    return k, v, scales


def launch_arguments(config: LeanConfig, kind: str) -> tuple[tuple, dict]:
    """The decode launcher's arguments for batch 1 on `caches(kind)`."""
    q = torch.zeros(1, 32, 128, dtype=torch.bfloat16)
    k, v, scales = caches(kind)
    capture = _Capture(lean_attention._lean_decode_kernel)
    real = lean_attention._lean_decode_kernel
    lean_attention._lean_decode_kernel = capture
    try:
        tables, lens = torch.zeros(1, 4, dtype=torch.int32), torch.full((1,), 64, dtype=torch.int32)
        lean_attention._launch(q, k, v, tables, lens, None, None, config, k_scale=scales, v_scale=scales)
    finally:
        lean_attention._lean_decode_kernel = real
    kwargs = dict(capture.kwargs, PDL=True)  # as on an H100
    return capture.args, kwargs


def source(kernel: triton.JITFunction, args: tuple, kwargs: dict) -> ASTSource:
    """The kernel specialised as the JIT specialises a launch: pointers and integers divisible by 16 get
    that divisibility, integers equal to 1 become constants (except do_not_specialize), None arguments
    constants."""
    names = kernel.arg_names
    values = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if i in kernel.constexprs or value is None:
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: unexpected argument {value!r}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and i not in kernel.do_not_specialize:
            signature[name], constants[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and i not in kernel.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, signature, constants, attrs)


def _cuobjdump(cubin: Path, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True, check=True).stdout


def loop_mix(sass: str) -> Counter:
    """Instructions of the innermost backward branch's range that holds every tensor-core product (HMMA,
    HGMMA or QGMMA), by opcode (predicates and modifiers dropped)."""
    code = [
        (int(m.group(1), 16), m.group(2).strip())
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    mma = [at for at, text in code if re.search(r"\b(HMMA|HGMMA|QGMMA)\b", text)]
    if not mma:
        return Counter()
    loops = []
    for at, text in code:
        branch = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) <= min(mma) and at >= max(mma):
            loops.append((int(branch.group(1), 16), at))
    start, end = min(loops, key=lambda span: span[1] - span[0])
    ops = (
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for at, text in code if start <= at <= end
    )
    return Counter(ops)


def compile_variant(
    name: str, config: LeanConfig, kind: str, dump: Path | None, max_registers: int | None = None
) -> Compiled:
    """The kernel of `config` on a cache of `kind` (CACHES), compiled (under a register cap where given)."""
    args, kwargs = launch_arguments(config, kind)
    options = {"num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]}
    if max_registers is not None:
        options["maxnreg"] = max_registers
    kernel = triton.compile(
        source(lean_attention._lean_decode_kernel, args, kwargs), target=TARGET, options=options
    )
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass, usage = _cuobjdump(cubin, "-sass"), _cuobjdump(cubin, "-res-usage")
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        for kind in ("ttgir", "ptx"):
            (dump / f"{name}.{kind}").write_text(kernel.asm[kind])
        (dump / f"{name}.sass").write_text(sass)
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"STACK:(\d+)", usage).group(1))  # spilled registers live on the thread's stack
    return Compiled(name, registers, spill, kernel.metadata.shared, options["num_warps"], loop_mix(sass))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-registers", type=int, nargs="*", default=[], help="register caps to add")
    parser.add_argument("--tile", type=int, help="tokens a tile instead of the launcher's")
    parser.add_argument("--dump", type=Path, help="write TTGIR, PTX and SASS of each variant here")
    args = parser.parse_args()
    caps = {"default": None} | {f"max {n} regs": n for n in args.max_registers}
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    columns = [
        "cache",
        "config",
        "tile",
        "registers",
        "spill bytes",
        "shared KB",
        "programs / SM",
        "loop instructions",
    ]
    print("| " + " | ".join([*columns, "of them spill loads / stores", "most frequent in the loop"]) + " |")
    print("|---|---|" + "---:|" * 7 + "---|")
    q = torch.zeros(1, 32, 128, dtype=torch.bfloat16)
    for kind in CACHES:
        config = launch_config(q, caches(kind)[1])
        if args.tile:
            config = replace(config, tile=args.tile)
        for label, cap in caps.items():
            c = compile_variant(f"{kind}-{label}".replace(" ", "-"), config, kind, args.dump, cap)
            cells = [
                kind,
                label,
                config.tile,
                c.registers,
                c.spill_bytes,
                f"{c.shared_bytes / 1024:.1f}",
                c.programs_per_sm(),
            ]
            cells += [sum(c.loop.values()), c.loop["LDL"] + c.loop["STL"]]
            cells.append(", ".join(f"{op} {n}" for op, n in c.loop.most_common(6)))
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
