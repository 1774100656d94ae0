#!/usr/bin/env bash
# Everything that needs a GPU in one command, because device time comes in small budgets:
#   benchmarks/gpu_suite.sh prepare   here (no GPU): copies what the GPU machine lacks into .cache/
#                                     (git-ignored): the default model's config + tokenizer files (no
#                                     weights); the Llama-3-8B config is in benchmarks/models/
#   benchmarks/gpu_suite.sh run [PART...]  there (device tool: carry [".cache"]); PART is tests (GPU tests
#                                     of kernels, models, engine, sampler), kernel, fused, linear, engine, tp,
#                                     structured, long (benchmarks), kvfp8 (the fp8 KV cache's decode benchmark
#                                     beside bf16 without the peers, then its GPU tests; its accuracy
#                                     needs real weights, which do not travel: kv_fp8_accuracy.py on CPU), fp8 (FP8 weights: their GPU tests,
#                                     bench_fp8_linear and bench_engine's bf16 and fp8 variants, under
#                                     $OUT/fp8; fp8-engine: bench_engine's variants alone, which on a cold
#                                     Triton cache take most of a call; fp8-profile: the FP8 engine's kernel
#                                     time per decode step by kernel); default all but kvfp8 and fp8 (tests, kernel and engine
#                                     already run theirs) and the tile sweeps long-tune (prefill kernel),
#                                     fp8-tune (W8A8 skinny product), kvfp8-tune (fp8 decode attention) and
#                                     kvfp8-e4m3-tune (the same with V's pages slot-major: e4m3 products),
#                                     kv-layout (decode attention on token- vs head-major cache blocks),
#                                     kv-stalls (Nsight Compute on the bf16 and fp8 decode kernel: warp
#                                     states and each SASS instruction's stall samples, as CSV and the
#                                     .ncu-rep), and
#                                     long-profile (attention alone, TTFT, then where an 8k and a chunked 32k
#                                     prompt's time goes).
#                                     Logs and results under $OUT, and the Triton cache as
#                                     $OUT/triton.tgz: copy it to .cache/triton.tgz for the next run. A device
#                                     call is limited to 10 minutes, so the parts share one deadline,
#                                     GPU_SUITE_SECONDS (default 570) from the start: each part gets what
#                                     is left, and the logs of a part cut off still come back. On a cold
#                                     Triton cache the engine part alone takes most of it.
# The GPU image has torch, triton and transformers but not fastapi/uvicorn: the HTTP tests are not run.
# Nor pydantic (the engine's configuration) and llguidance (structured outputs), which the engine imports:
# carry their wheels (pydantic, pydantic_core, annotated_types, typing_inspection, typing_extensions,
# llguidance; versions from constraints.txt, for Python 3.12) and put them on PYTHONPATH first.
set -uo pipefail
cd "$(dirname "$0")/.."
default_model=SmolLM2-135M-Instruct

# Nsight Compute around bench_decode_attention.py --launch-for-profiler (each variant launched twice, its
# second launch inside an NVTX range of its name), clocks left alone as the device notes ask.
profile_decode_stalls() {
    local out=$1 ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
    [[ -n $ncu ]] || { echo "ncu not found"; return 1; }
    "$ncu" --clock-control none --nvtx --kernel-name regex:_lean_decode_kernel --import-source yes \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
        --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        -f -o "$out/kv_stalls" python3 benchmarks/bench_decode_attention.py --launch-for-profiler || return 1
    "$ncu" -i "$out/kv_stalls.ncu-rep" --page details --csv >"$out/kv_stalls_details.csv"
    "$ncu" -i "$out/kv_stalls.ncu-rep" --page raw --csv >"$out/kv_stalls_raw.csv"
    "$ncu" -i "$out/kv_stalls.ncu-rep" --page source --print-source sass --csv >"$out/kv_stalls_sass.csv"
    # Per launch: duration, registers, occupancy, issue rate and the stall reasons over 0.05 cycles an
    # instruction (the raw page: a header row, a units row, then a row per launch).
    python3 - "$out/kv_stalls_raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head, launches = rows[0], rows[2:]
keys = ["gpu__time_duration.sum", "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active",
        "smsp__issue_active.avg.pct_of_peak_sustained_active", "dram__bytes.sum.per_second"]
for row in launches:
    r = dict(zip(head, row))
    print(r.get("NVTX", ""), r.get("Grid Size", ""), {k: r.get(k) for k in keys})
    stalls = {k.split("stalled_")[1].split("_per")[0]: float(v) for k, v in r.items()
              if k.endswith("_per_issue_active.ratio") and v.replace(".", "", 1).isdigit()}
    print("  stalls (cycles an issued instruction):",
          {k: round(v, 2) for k, v in sorted(stalls.items(), key=lambda kv: -kv[1]) if v >= 0.05})
PY
}

case "${1:-}" in
prepare)
    src=${LEANSERVE_CACHE:-$HOME/.cache/leanserve}/$default_model
    [[ -f $src/config.json ]] || { echo "convert the default model first (scripts/serve.sh or the tests)"; exit 1; }
    mkdir -p ".cache/leanserve/$default_model"
    cp "$src"/*.json "$src"/*.jinja ".cache/leanserve/$default_model/" 2>/dev/null
    du -sh .cache
    ;;
run)
    out=${OUT:-out/gpu}
    mkdir -p "$out"
    # The GPU image lacks setuptools' editable hook: the leanserve namespace is a folder of links to the
    # checkout's packages instead.
    site=$(mktemp -d)
    mkdir "$site/leanserve"
    for package in server models kernels; do ln -s "$PWD/$package" "$site/leanserve/$package"; done
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 LEANSERVE_CACHE=$PWD/.cache/leanserve
    # Compiling the kernels is most of a cold run's time: the Triton cache comes and goes as an archive
    # (.cache/triton.tgz, from the last run's $OUT/triton.tgz), which any sm_90 GPU with this Triton reuses.
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
    mkdir -p "$TRITON_CACHE_DIR"
    if [[ -f .cache/triton.tgz && -z $(ls -A "$TRITON_CACHE_DIR") ]]; then
        tar -xzf .cache/triton.tgz -C "$TRITON_CACHE_DIR" && echo "Triton cache: $(du -sh "$TRITON_CACHE_DIR" | cut -f1) unpacked"
    fi
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
    deadline=$((SECONDS + ${GPU_SUITE_SECONDS:-570}))
    parts=("${@:2}")
    [[ ${#parts[@]} -gt 0 ]] || parts=(tests kernel fused linear engine tp structured long)
    for part in "${parts[@]}"; do
        ((SECONDS < deadline)) || { echo "no time left for $part" | tee "$out/$part.log"; continue; }
        case $part in
        # Eight test processes: on a cold Triton cache the tests wait mostly on compiling kernels, on the CPU.
        tests) timeout $((deadline - SECONDS)) python3 -m pytest -v -n 8 -m gpu -p no:cacheprovider tests/test_lean_attention.py \
            tests/test_prefill_attention.py tests/test_sdpa_prefill.py tests/test_fused_ops.py tests/test_skinny_linear.py tests/test_models.py tests/test_engine.py \
            tests/test_sampler.py tests/test_launch.py tests/test_decode_inputs.py tests/test_argmax.py \
            tests/test_kv_fp8.py tests/test_fp8.py ;;
        kernel) timeout $((deadline - SECONDS)) python3 benchmarks/bench_decode_attention.py --out "$out" ;;
        fused) timeout $((deadline - SECONDS)) python3 benchmarks/bench_fused_ops.py --out "$out" ;;
        linear) timeout $((deadline - SECONDS)) python3 benchmarks/bench_skinny_linear.py --out "$out" ;;
        engine) timeout $((deadline - SECONDS)) python3 benchmarks/bench_engine.py --out "$out" ;;
        structured) timeout $((deadline - SECONDS)) python3 benchmarks/bench_structured.py --load-format dummy \
            --model benchmarks/models/llama-3-8b --tokenizer ".cache/leanserve/$default_model" ;;
        fp8) timeout $((deadline - SECONDS)) bash -c "python3 -m pytest -v -m gpu -p no:cacheprovider \
            tests/test_fp8.py; python3 benchmarks/bench_fp8_linear.py --out '$out'; \
            python3 benchmarks/bench_engine.py --out '$out/fp8' --variants timing_on fp8" ;;
        fp8-engine) timeout $((deadline - SECONDS)) python3 benchmarks/bench_engine.py --out "$out/fp8" \
            --variants timing_on fp8 ;;
        fp8-profile) timeout $((deadline - SECONDS)) python3 benchmarks/bench_engine.py --profile --quantization fp8 ;;
        tp) timeout $((deadline - SECONDS)) python3 benchmarks/bench_tp_attention.py --out "$out" ;;
        long) timeout $((deadline - SECONDS)) python3 benchmarks/bench_long_context.py --out "$out" ;;
        long-tune) timeout $((deadline - SECONDS)) python3 benchmarks/bench_long_context.py --tune --out "$out" ;;
        long-profile) timeout $((deadline - SECONDS)) python3 benchmarks/bench_long_context.py --parts attention ttft profile \
            --out "$out" ;;
        fp8-tune) timeout $((deadline - SECONDS)) python3 benchmarks/bench_fp8_linear.py --tune --out "$out" ;;
        kv-layout) timeout $((deadline - SECONDS)) python3 benchmarks/bench_decode_attention.py --layouts --out "$out" ;;
        kv-stalls) export -f profile_decode_stalls; timeout $((deadline - SECONDS)) bash -c "profile_decode_stalls '$out'" ;;
        kvfp8-tune) timeout $((deadline - SECONDS)) python3 benchmarks/bench_decode_attention.py --tune --fp8 --out "$out" ;;
        kvfp8-e4m3-tune) timeout $((deadline - SECONDS)) python3 benchmarks/bench_decode_attention.py --tune --fp8 --e4m3 \
            --out "$out" ;;
        # The benchmark first, so that a call the tests' compilations run long still brings its timings back;
        # it checks both fp8 forms' outputs itself.
        kvfp8) timeout $((deadline - SECONDS)) bash -c "python3 benchmarks/bench_decode_attention.py --skip-peers \
            --out '$out'; python3 -m pytest -v -n 8 -m gpu -p no:cacheprovider tests/test_kv_fp8.py" ;;
        *) echo "unknown part $part" >&2 ;;
        esac 2>&1 | tee "$out/$part.log"
    done
    # Written under a temporary name first, so an archive cut off by the call's limit is never taken for a
    # whole one; the device tool returns files of up to 16 MiB.
    tar -czf "$out/triton.tgz.part" -C "$TRITON_CACHE_DIR" . && mv "$out/triton.tgz.part" "$out/triton.tgz"
    if (($(stat -c %s "$out/triton.tgz") > 16 * 1024 * 1024)); then
        echo "Triton cache archive over 16 MiB: not returned (the next run compiles afresh)"
        rm "$out/triton.tgz"
    fi
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
