#!/usr/bin/env bash
# Run a moe_jax command on the GPUs of this host as one JAX process. See --help.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_single_host.sh [options] -- COMMAND...

Runs COMMAND as one JAX process over the chosen GPUs of this host: the mesh spans them (make_mesh sizes from gin),
no jax.distributed. The command replaces this script's process, so SIGTERM reaches it directly (a checkpoint of
the current step, then exit status 143; rerun to resume).

Options:
  --gpus LIST          comma-separated GPU indices, e.g. 0,1,2,3 (default: every GPU)
  --mem_fraction F     share of each GPU's memory JAX preallocates, in (0, 1] (default: JAX's, 0.75)
  --dry_run            print the command instead of running it
  -h, --help           this message

Example:
  launch/gpu_single_host.sh --gpus 0,1,2,3 -- python -m moe_jax.train --gin_file=gin/demo.gin --gin.make_mesh.model=2
USAGE
}

GPUS="" MEM_FRACTION=""
VALUE_FLAGS=(gpus mem_fraction)
SWITCHES=()
parse "$@"

ENV=(MOE_JAX_DISTRIBUTED=0)
if [[ -n "$GPUS" ]]; then
  check --gpus "$GPUS" '^[0-9]+(,[0-9]+)*$' "comma-separated GPU indices such as 0,1"
  ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
fi
if [[ -n "$MEM_FRACTION" ]]; then
  check --mem_fraction "$MEM_FRACTION" '^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$' "a fraction in (0, 1]"
  ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
fi
((DRY_RUN)) || command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this host has no NVIDIA driver"

if ((DRY_RUN)); then
  run env "${ENV[@]}" "${COMMAND[@]}"
else
  exec env "${ENV[@]}" "${COMMAND[@]}"
fi
