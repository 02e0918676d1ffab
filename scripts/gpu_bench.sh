#!/usr/bin/env bash
# The measurements a GPU user wants, in one run of under 8 minutes, as JSON:
#
#   1. providers.json   onnxruntime's version and providers, and whether the CUDA and
#                       TensorRT providers load here (ONNX Runtime's reason when not);
#   2. bare-*.json      bare generator inference (the full stand-in UNet-328) at batch
#                       1/4/8/16/32: CUDA FP32, CUDA FP16, and TensorRT FP16 where present;
#   3. render.json      `bench render`: 60 s of speech at 720p with the GPU defaults (pools
#                       sized from the cluster), next to bare inference on the same provider;
#   4. nvidia-smi.csv   GPU utilisation, memory and power, sampled every second throughout;
#
# all gathered into OUT/gpu_bench.json. Nothing is downloaded: the stand-in models and the
# avatar are generated. Works offline once the wheels are installed (README, "GPUs").
#
# Usage: scripts/gpu_bench.sh [OUT_DIR] [--dry-run]
#   --dry-run  write providers.json and the plan (the commands), run nothing else: a check
#              that the script and the install work, seconds on any machine.
# Environment: PYTHON (default python3), SECONDS_RENDER (60), TRT_TIMEOUT_S (150: a TensorRT
# engine builds per batch shape and can take minutes; the cache in OUT/trt keeps them).
set -euo pipefail

OUT=""
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) OUT="$arg" ;;
    esac
done
OUT="${OUT:-gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)}"
PY="${PYTHON:-python3}"
SECONDS_RENDER="${SECONDS_RENDER:-60}"
TRT_TIMEOUT_S="${TRT_TIMEOUT_S:-150}"
BATCHES="1,4,8,16,32"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LIPSYNC=("$PY" -m lipsync_ray.cli)
PLAN="$OUT/plan.txt"
: >"$PLAN"
T0=$(date +%s)

log() { echo "gpu_bench: $*" >&2; }

# Runs "$@" with its stdout to file $1 (unless a dry run); records the exit status.
step() {
    local name="$1" limit="$2"
    shift 2
    echo "$name: timeout $limit $*" >>"$PLAN"
    if [[ $DRY -eq 1 ]]; then
        return 0
    fi
    log "$name ($(($(date +%s) - T0)) s in)"
    local rc=0
    timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log" || rc=$?
    echo "$rc" >"$OUT/$name.rc"
    [[ $rc -eq 0 ]] || log "$name failed (exit $rc), see $OUT/$name.log"
}

# 1. providers: what is installed and whether the GPU providers load (a one-node probe each).
"$PY" - "$OUT/providers.json" <<'EOF'
import json, shutil, subprocess, sys

import onnxruntime as ort

from lipsync_ray.inference import GPU_PROVIDERS, preload_gpu_libraries, probe_provider

info = {
    "onnxruntime": ort.__version__,
    "device": ort.get_device(),
    "available": ort.get_available_providers(),
    "preload_dlls": preload_gpu_libraries(),
}
try:
    from onnxruntime.capi import build_and_package_info as build

    info["built_with_cuda"] = getattr(build, "cuda_version", None)
except ImportError:
    info["built_with_cuda"] = None
for provider in GPU_PROVIDERS:
    reason = probe_provider(provider)
    info[provider.value] = {"loads": reason is None, "reason": reason}
smi = shutil.which("nvidia-smi")
if smi:
    query = "--query-gpu=name,driver_version,memory.total"
    out = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
    info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
CUDA_OK=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['CUDAExecutionProvider']['loads']))" "$OUT/providers.json")
TRT_OK=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['TensorrtExecutionProvider']['loads']))" "$OUT/providers.json")

# 4. nvidia-smi samples, every second, for the whole run.
SMI_PID=""
if [[ $DRY -eq 0 ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,utilization.memory,memory.used,power.draw \
        --format=csv,noheader,nounits -l 1 >"$OUT/nvidia-smi.csv" 2>/dev/null &
    SMI_PID=$!
fi
stop_smi() { [[ -n "$SMI_PID" ]] && kill "$SMI_PID" 2>/dev/null || true; }
trap stop_smi EXIT

MODEL="$OUT/unet-full.onnx"
if [[ $DRY -eq 0 ]]; then
    "${LIPSYNC[@]}" models build --arch unet328 --size full -o "$MODEL" >&2
fi

# 2. bare inference on the GPU providers that load (FP16: the model converted, not gated).
BARE=("${LIPSYNC[@]}" bench inference --model "$MODEL" --batch "$BATCHES" --seconds 2 --json)
if [[ $CUDA_OK -eq 1 || $DRY -eq 1 ]]; then
    step bare-cuda-fp32 120 "${BARE[@]}" --providers cuda
    step bare-cuda-fp16 120 "${BARE[@]}" --providers cuda --precision fp16
fi
if [[ $TRT_OK -eq 1 || $DRY -eq 1 ]]; then
    step bare-tensorrt-fp16 "$TRT_TIMEOUT_S" "${BARE[@]}" --providers tensorrt --fp16 \
        --trt-cache "$OUT/trt"
fi

# 3. a render with the GPU defaults: no pool flags, so the pools are sized from the cluster
# (4 inference actors per GPU at batch 16, compositors from the CPUs left).
if [[ $CUDA_OK -eq 1 || $DRY -eq 1 ]]; then
    step render 300 "${LIPSYNC[@]}" bench render --model full --seconds "$SECONDS_RENDER" \
        --providers cuda,cpu --json "$OUT/render-result.json"
fi
stop_smi

# Everything in one file.
"$PY" - "$OUT" "$DRY" "$(($(date +%s) - T0))" <<'EOF'
import json, pathlib, sys

out, dry, elapsed = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
result = {
    "dry_run": dry,
    "elapsed_s": elapsed,
    "plan": (out / "plan.txt").read_text().splitlines(),
    "providers": json.loads((out / "providers.json").read_text()),
}
for rc in sorted(out.glob("*.rc")):
    name = rc.stem
    body = out / ("render-result.json" if name == "render" else f"{name}.json")
    entry = {"exit_code": int(rc.read_text())}
    try:
        entry["result"] = json.loads(body.read_text())
    except (OSError, ValueError):
        log = out / f"{name}.log"
        entry["log_tail"] = log.read_text()[-2000:] if log.exists() else ""
    result[name] = entry
smi = out / "nvidia-smi.csv"
if smi.exists():
    keys = ["timestamp", "gpu", "util_gpu_pct", "util_mem_pct", "mem_used_mib", "power_w"]
    result["nvidia_smi"] = [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in smi.read_text().splitlines()
        if line.strip()
    ]
(out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
print(out / "gpu_bench.json")
EOF
