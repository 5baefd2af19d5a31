#!/usr/bin/env bash
# Run a moe_jax command on several GPU nodes under SLURM: write a batch script with one task per node and submit it.
# See --help.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm_gpu.sh --nodes N [options] -- COMMAND...

Writes a SLURM batch script that starts COMMAND once per node with srun (one JAX process per node, owning that
node's GPUs) and submits it with sbatch. moe_jax sees SLURM_NTASKS > 1 and calls jax.distributed.initialize,
which reads the coordinator, process count and index from SLURM's environment. SLURM sends SIGTERM two minutes
before the time limit (or on preemption): the run saves a checkpoint and exits; with --requeue SLURM restarts a
preempted job, which resumes from that checkpoint. The job runs in the directory it was submitted from; the
package (pip install -e) and train.model_dir must be on file systems that every node sees.

Options:
  --nodes N            nodes (one task each)
  --gpus_per_node G    GPUs per node (default 8)
  --partition NAME     SLURM partition (default: the cluster's)
  --account NAME       SLURM account (default: the user's)
  --time D-HH:MM:SS    time limit (default 1-00:00:00; also HH:MM:SS)
  --job_name NAME      job name (default moe_jax)
  --venv DIR           Python environment to activate on every node (default: none, the login shell's python)
  --log_dir DIR        where the batch script and the job's log go (default runs/slurm)
  --requeue            let SLURM requeue the job after a preemption or node failure
  --dry_run            print the batch script and the sbatch command instead of submitting
  -h, --help           this message

Example:
  launch/slurm_gpu.sh --nodes 4 --gpus_per_node 8 --partition a100 --venv ~/venvs/moe_jax -- \
    python -m moe_jax.train --gin_file=gin/models/t5_1_1_xxl.gin --gin_file=gin/expert.gin --gin.make_mesh.fsdp=8 ...
USAGE
}

NODES="" GPUS_PER_NODE=8 PARTITION="" ACCOUNT="" TIME=1-00:00:00 JOB_NAME=moe_jax VENV="" LOG_DIR=runs/slurm REQUEUE=0
VALUE_FLAGS=(nodes gpus_per_node partition account time job_name venv log_dir)
SWITCHES=(requeue)
parse "$@"

check --nodes "$NODES" '^[1-9][0-9]*$' "a positive count"
check --gpus_per_node "$GPUS_PER_NODE" '^[1-9][0-9]*$' "a positive count"
check --time "$TIME" '^([0-9]+-)?[0-9]+:[0-9]{2}:[0-9]{2}$' "D-HH:MM:SS or HH:MM:SS"
check --job_name "$JOB_NAME" '^[A-Za-z0-9_.-]+$' "letters, digits, '_', '.', '-'"
if [[ -n "$VENV" && ! -f "$VENV/bin/activate" ]]; then
  die "--venv $VENV: no bin/activate there"
fi

SCRIPT="$LOG_DIR/$JOB_NAME.sbatch"
batch_script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --signal=TERM@120"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.log"
  echo "#SBATCH --open-mode=append"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  ((REQUEUE)) && echo "#SBATCH --requeue"
  echo "set -euo pipefail"
  [[ -n "$VENV" ]] && echo "source $(quoted "$VENV/bin/activate")"
  echo "srun --kill-on-bad-exit=1 $(quoted "${COMMAND[@]}")"
}

if ((DRY_RUN)); then
  batch_script
else
  mkdir -p "$LOG_DIR"
  batch_script >"$SCRIPT"
fi
run sbatch "$SCRIPT"
