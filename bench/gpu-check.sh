#!/usr/bin/env bash
# The whole GPU check in one prepared call, for a GPU machine lent without registry access (an H200 image with
# torch, triton, transformers and onnxruntime, but not diffusers, pydantic or open-clip-torch). A device returns at
# most 8 files from $OUT, no more than 2 folders down: so the run makes its files in a folder of its own ($WORK) and
# after every step packs everything made so far into $OUT/gpu-check.tgz (movielm_fast.bench.gpu_check), so a run
# cut short still returns every finished step. $OUT keeps beside it steps.log and goals.log, to read at once, and
# the log of the step in flight. How a GPU run is done, start to end: docs/gpu.md.
#
#   bash bench/gpu-check.sh --prepare     # here, with registry access: the missing wheels into wheels/ (git-ignored)
#   bash bench/gpu-check.sh [--quick]     # there, from the repository root, with wheels/ carried along
#   bash bench/gpu-check.sh --lossy       # there, as a call of its own: FP8 and step caching (issues 25, 36)
#   python -m movielm_fast.bench.gpu_check unpack gpu-check.tgz   # here: into bench/results/, RESULTS.md anew
#
# Steps, each under its own time limit (580 s in all at most, packing aside, inside one 10-minute device call, so a
# device session's 15 minutes leave room for the machine's start), the ones that must not be lost first: the wheels;
# environment; bench.gpu for sd15-arch and sdxl-arch, ours beside diffusers eager (and our fp32 reference for PSNR);
# where an fp16 image goes wrong in diffusers (bench.fp16_range in fp16 with inf/NaN hooks); the GPU tests (pytest
# -m gpu); a second process's time to first image (compile and graph caches warm); the DiT rows (flux-arch,
# klein-arch); last, diffusers+compile at the best batch (its compile alone took over 150 s on the first H200 run,
# so it may run out of time: everything before it is kept); then the goals table. Results go to $WORK/results
# (this run's only), RESULTS.md to $WORK.
# KNOBS=1 adds each lossless knob to the sd15 run (a longer call: give it its own). FRAMES=1 packs the rendered
# frames too, as far as the archive's budget goes. GIT_COMMIT=<hash> names the commit where the device's copy of
# the tree has no .git. `OUT=... WORK=... bash bench/gpu-check.sh --pack` only packs (the CPU test runs that).
set -uo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEPS="diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions importlib-metadata zipp
      open-clip-torch"

if [ "${1:-}" = "--prepare" ]; then
    rm -rf wheels && mkdir -p wheels
    # shellcheck disable=SC2086
    pip download -q --only-binary=:all: --python-version "$PYVER" --platform manylinux_2_17_x86_64 --no-deps \
        -d wheels $DEPS
    ls -la wheels
    exit 0
fi

OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
PY=${PY:-python3}
DEPS_DIR=$(mktemp -d)
export PYTHONPATH="$DEPS_DIR:$PWD/src" HF_HUB_OFFLINE=1 MOVIELM_CACHE=${MOVIELM_CACHE:-/tmp/movielm-cache}

pack() {  # all made so far, and whatever a step left in $OUT, into $OUT/gpu-check.tgz; never stops the script
    # shellcheck disable=SC2086
    "$PY" -m movielm_fast.bench.gpu_check pack "$WORK" "$OUT" ${FRAMES:+--frames} && return 0
    local rc=$?
    echo "   packing failed (exit $rc): $OUT/gpu-check.tgz holds the steps before" | tee -a "$OUT/steps.log"
    return $rc
}

# step NAME SECONDS COMMAND...: run with a limit, never stop the script. The log is $OUT/NAME.log while the step
# runs (a call killed then still returns it); the packing after the step moves it into the archive.
step() {
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$OUT/steps.log"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? $(date -u +%T)" | tee -a "$OUT/steps.log"
    pack
}

finish() {
    cp src/movielm_fast/engine/cuda_knobs.json "$WORK/" 2>/dev/null
    echo "done $(date -u +%T)" >> "$OUT/steps.log"
    pack
}

MODE=full
case "${1:-}" in
    --pack) pack; exit $? ;;
    --quick) MODE=quick ;;
    --lossy) MODE=lossy ;;
esac
QUICK=""; [ "$MODE" = quick ] && QUICK="--quick"
"$PY" -m movielm_fast.bench.gpu_check start "$WORK" --mode "$MODE"
step install 30 "$PY" -m pip install -q --no-index --no-deps --target "$DEPS_DIR" wheels/*.whl

RES="$WORK/results"
mkdir -p "$RES"
if [ "$MODE" = lossy ]; then
    # The opt-in lossy accelerators on the GPU: their GPU tests, images/s with FP8 beside fp16 at the best batch,
    # and PSNR/SSIM of FP8 and step caching against the fp16 render of the full-size architectures.
    step env 15 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(), \
torch.cuda.get_device_capability())'"
    step tests-lossy 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8.py tests/test_step_cache.py \
        tests/test_dit_accel.py
    step fp8-sdxl 120 "$PY" -m movielm_fast.bench.gpu --model sdxl-arch --peer-compile off --out "$RES" \
        --backend torch,torch+quantize=fp8 --batch-sizes 4,8 --repeats 2
    step fp8-sd15 90 "$PY" -m movielm_fast.bench.gpu --model sd15-arch --peer-compile off --out "$RES" \
        --backend torch,torch+quantize=fp8 --batch-sizes 8,16 --repeats 2
    step lossy-sd15 60 "$PY" -m movielm_fast.bench.lossy_arch --model sd15-arch --size 512 --steps 20 --prompts 4 \
        --device cuda --results "$RES"
    step lossy-sdxl 120 "$PY" -m movielm_fast.bench.lossy_arch --model sdxl-arch --size 1024 --steps 20 \
        --prompts 2 --device cuda --results "$RES"
    # The DiT rows (issue 36): flux-arch at 1024², one transformer step bf16 beside FP8, and a 28-step loop with the
    # VAE decode, plain and with the step cache (docs/dit-accelerators.md). Its quality is the CPU run's.
    step dit-flux 90 "$PY" -m movielm_fast.bench.dit_accel --gpu --arch flux-arch --size 1024 --gpu-steps 28 \
        --results "$RES"
    finish
    exit 0
fi
step env 15 bash -c "nvidia-smi; $PY -c 'import torch, diffusers, transformers; print(torch.__version__, \
torch.version.cuda, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())'"
SD15_ARGS="--batch-sizes 1,8 --repeats 2"; [ -n "$QUICK" ] && SD15_ARGS="$QUICK"
# shellcheck disable=SC2086
step bench-sd15 100 "$PY" -m movielm_fast.bench.gpu --model sd15-arch --peer-compile off --out "$RES" $SD15_ARGS \
    ${KNOBS:+--knobs}
[ -z "$QUICK" ] && step bench-sdxl 100 "$PY" -m movielm_fast.bench.gpu --model sdxl-arch --peer-compile off \
    --out "$RES" --batch-sizes 1,4 --repeats 2
step fp16-range 40 "$PY" -m movielm_fast.bench.fp16_range --model sd15-arch --size 512 --steps 20 --device cuda \
    --dtype fp16 --results "$RES"
step tests-gpu 70 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests

# A second process, same model: what a render pays before its first image once the caches are warm.
PLAN="$WORK/one-frame.json"
printf '%s' '{"id":"ttfi","title":"t","style":{"name":"Gothic","description":"sepia"},"characters":[],
"frames":[{"id":"001","description":"a castle on a hill"}],"render":{"width":512,"height":512,"steps":20}}' > "$PLAN"
SD15=$("$PY" -c "from movielm_fast.bench.models import arch_model_path as p; print(p('sd15-arch'))")
for i in 1 2; do
    step "render-$i" 30 "$PY" -m movielm_fast.cli.main render "$PLAN" --model "$SD15" \
        --device cuda --no-style-training --force --json --out "$WORK/render"
done

# DiT rows (another issue adds them) go here, before the compile peer that may run out of time: each as
# `step NAME SECONDS COMMAND` with its results under "$RES" (--out or --results). step() packs them, and
# `gpu_check unpack` moves what is under "$RES" into bench/results/: nothing else is needed.

# Issue 35's DiT rows: FLUX.1 [dev] at its 28 steps and FLUX.2 [klein] 4B step-distilled at its 4, real
# architectures with random weights built in memory on the GPU (34 and 16 GB of bf16 weights: no disk), 1024²
# (their native size), bf16, batch 1, beside diffusers' FluxPipeline / Flux2KleinPipeline on the same modules:
# transformer it/s and its MFU, s/frame. No fp32 reference (fp32 FLUX.1 would not fit beside the bf16 one) and no
# compile peer (none is written for DiTs). Limits from an estimate, not a measurement (no GPU run yet): flux-arch
# ~55 s (a step ~125 TFLOP, ~0.3 s eager on an H100; 4 renders of 28 steps ~35 s; start, build, FLOP count and
# ceilings ~20 s), klein-arch ~20 s (a step ~42 TFLOP; 4 renders of 4 steps ~5 s; the rest as above).
[ -z "$QUICK" ] && step bench-flux 75 "$PY" -m movielm_fast.bench.gpu --model flux-arch --dtype bf16 --steps 28 \
    --batch-sizes 1 --repeats 1 --peer-compile off --no-fp32-reference --out "$RES"
[ -z "$QUICK" ] && step bench-klein 35 "$PY" -m movielm_fast.bench.gpu --model klein-arch --dtype bf16 --steps 4 \
    --batch-sizes 1 --repeats 2 --peer-compile off --no-fp32-reference --out "$RES"

# (40 s since the DiT rows came: its compile alone took over 150 s on the first H200 run, so within this call it is
# a try that does not finish either way; a call of its own is needed to time it.)
[ -z "$QUICK" ] && step peer-compile 40 "$PY" -m movielm_fast.bench.gpu --model sd15-arch --peer-compile default \
    --out "$RES" --batch-sizes 8 --repeats 2

# Every row of the issue's goals table, from this run's results and the second render's --json output.
step goals 15 "$PY" -m movielm_fast.bench.gpu --goals --out "$RES" --render-json "$WORK/render-2.log"
cat "$OUT/goals.log"
finish
