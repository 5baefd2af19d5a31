#!/usr/bin/env bash
# Issue 19's accelerator checks as one prepared run of at most 9.5 minutes (one device call), each step under its
# own time limit so that one slow step cannot spend the whole device budget:
#   1. routed_lora.py --check --peer, one T5-XL layer: base vs routed top-2 of E = 8, 36, 166 with every formulation
#      but ragged (a slow path on GPUs), each checked against dense, beside the PHATGOOSE reference dispatch
#      (PyTorch) on the same shapes
#   2. routed_lora.py, the whole T5-XL forward (24+24 layers), top-2 of 166: auto and sorted vs base
#   3. train_step.py --remat: the expert step (frozen T5-XL, one LoRA): ms/step and MFU
# Its last line is the `benchmarks/input_pipeline.py --step_ms` to run on a host with TensorFlow (the GPU image has
# none) against the measured expert step.
#
# Usage, from the repository root: bash benchmarks/gpu_checks.sh [OUT_DIR]    (default: $OUT, else /tmp/gpu_checks)
#   PRESET=cpu bash benchmarks/gpu_checks.sh /tmp/x   runs the same steps on the small CPU presets (a dry run here)
# Needs jax, flax, optax, numpy and PyTorch, plus gin-config, which the device image lacks: put its wheel in .whl/
# (`pip download --no-deps -d .whl gin-config`) and carry .whl. The peer script lies outside the repository; copy it
# in and carry it too: `mkdir -p .peer && cp ../shared/bench/phatgoose_reference_layer.py .peer/` (PEER=path to
# use another). Both folders belong in .git/info/exclude.
set -uo pipefail

out=${1:-${OUT:-/tmp/gpu_checks}}
preset=${PRESET:-t5xl}
peer=${PEER:-$PWD/.peer/phatgoose_reference_layer.py}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -f $peer ]] || peer=$PWD/../shared/bench/phatgoose_reference_layer.py

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || lscpu | head -20
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"; } \
  | tee "$out/machine.txt"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND in benchmarks/, its output to the terminal and OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name: $* (limit ${limit}s)"
  (cd benchmarks && timeout "$limit" "$@") 2>&1 | tee "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

if [[ $preset == t5xl ]]; then layer_preset=t5xl; else layer_preset=cpu_xl; fi
step routed_layer 240 python3 routed_lora.py --preset "$layer_preset" --check --benches layer --k 2 \
  --impls "$(if [[ $preset == t5xl ]]; then echo dense,sorted,grid,pallas,auto; else echo sorted,grid,auto; fi)" \
  --peer "$peer"
step routed_model 180 python3 routed_lora.py --preset "$preset" --benches model --experts 166 --k 2 \
  --impls auto,sorted --repeats 5
step train_step 150 python3 train_step.py --preset "$preset" --remat --stages expert

step_ms=$(awk '$1 == "expert" && $3 ~ /^[0-9.]+$/ {print $3; exit}' "$out/train_step.txt")
echo "then, on a host with TensorFlow: python benchmarks/input_pipeline.py --step_ms ${step_ms:-<expert ms/step>}" \
  | tee -a "$out/machine.txt"
