#!/usr/bin/env bash
# Run a moe_jax command on a Cloud TPU VM slice: create it, install this package on every worker, run the command on
# all workers at once, stream their output, delete the slice. See --help.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator TYPE [options] -- COMMAND...

Creates a Cloud TPU VM slice (directly, or through a queued resource), copies this repository's committed tree
(git archive HEAD) to every worker and installs it, runs COMMAND on all workers at once (--worker=all: one JAX
process per host, joined by jax.distributed through MOE_JAX_DISTRIBUTED=1), streams the output, and deletes the
slice. After a preemption it recreates the slice and reruns COMMAND, which resumes from its last checkpoint
(keep train.model_dir on storage that outlives the VMs and every worker sees: a GCS bucket mounted with gcsfuse).

Options:
  --name NAME          TPU (and queued resource) name: lowercase letters, digits, hyphens
  --zone ZONE          e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --accelerator TYPE   slice type: v4-8, v4-32, v5litepod-16, v5p-64, v6e-16, ...
  --version VERSION    TPU software version (default by generation: v4 tpu-ubuntu2204-base,
                       v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project PROJECT    gcloud project (default: gcloud's configured project)
  --spot               spot capacity: cheaper, preemptible
  --queued             create through a queued resource (waits for capacity instead of failing)
  --restarts N         after a preemption, recreate the slice and rerun up to N times (default 0)
  --keep               leave the slice running at the end (default: delete it)
  --dry_run            print the commands instead of running them
  -h, --help           this message

Example:
  launch/tpu_vm.sh --name moe-v4 --zone us-central2-b --accelerator v4-32 --spot --restarts 3 -- \
    python -m moe_jax.train --gin_file=gin/phatgoose.gin --gin.phatgoose_pipeline.run_dir="'/gcs/bucket/run'"
USAGE
}

NAME="" ZONE="" ACCELERATOR="" VERSION="" PROJECT="" SPOT=0 QUEUED=0 RESTARTS=0 KEEP=0
VALUE_FLAGS=(name zone accelerator version project restarts)
SWITCHES=(spot queued keep)
parse "$@"

check --name "$NAME" '^[a-z]([-a-z0-9]*[a-z0-9])?$' "lowercase letters, digits and hyphens, starting with a letter"
check --zone "$ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "a zone such as us-central2-b"
check --accelerator "$ACCELERATOR" '^(v4|v5litepod|v5p|v6e)-[0-9]+$' "a slice type such as v4-32 or v5litepod-16"
check --restarts "$RESTARTS" '^[0-9]+$' "a count"
if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
  esac
fi

WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
CAPACITY=()
((SPOT)) && CAPACITY=(--spot)
ARCHIVE="${TMPDIR:-/tmp}/moe_jax-$NAME.tar.gz"

create() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${WHERE[@]}" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$VERSION" "${CAPACITY[@]}"
    run gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format 'value(state.state)'
    until ((DRY_RUN)) || [[ "$(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" \
      --format 'value(state.state)')" == ACTIVE ]]; do
      echo "waiting for queued resource $NAME to become ACTIVE" >&2
      sleep 60
    done
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" \
      --version "$VERSION" "${CAPACITY[@]}"
  fi
}

install() {
  run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:moe_jax.tar.gz" --worker=all "${WHERE[@]}"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" --command \
    "mkdir -p moe_jax && tar xzf moe_jax.tar.gz -C moe_jax && pip install -q -e './moe_jax[data]' 'jax[tpu]'"
}

execute() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" --command \
    "cd moe_jax && MOE_JAX_DISTRIBUTED=1 $(quoted "${COMMAND[@]}")"
}

delete() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

preempted() {
  ((!DRY_RUN)) || return 1
  if ((QUEUED)); then
    [[ "$(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format 'value(state.state)')" \
      == SUSPEND* ]]
  else
    [[ "$(gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format 'value(state)')" == PREEMPTED ]]
  fi
}

((KEEP)) || trap delete EXIT
for ((attempt = 0; ; attempt++)); do
  create
  install
  status=0
  execute || status=$?
  if ((status != 0 && attempt < RESTARTS)) && preempted; then
    echo "slice $NAME was preempted: recreating it (restart $((attempt + 1)) of $RESTARTS)" >&2
    delete
    continue
  fi
  exit "$status"
done
