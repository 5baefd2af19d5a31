"""The launch scripts: --help, argument errors (one line, status 2), and the commands their --dry_run prints."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("tpu_vm.sh", "slurm_gpu.sh", "gpu_single_host.sh")
TRAIN = ["python", "-m", "moe_jax.train", "--gin_file=gin/demo.gin", "--gin.train.model_dir='/gcs/bucket/run 1'"]


def _launch(script, *args):
  return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, TMPDIR="/tmp"))


def _commands(stdout):
  """The dry-run commands, split into words as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  result = _launch(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith(f"Usage: launch/{script}")


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", ["--zone", "us-central2-b", "--accelerator", "v4-8", "--", "x"], "--name is required"),
    ("tpu_vm.sh", ["--name", "Big", "--zone", "us-central2-b", "--accelerator", "v4-8", "--", "x"],
     "--name Big: expected lowercase"),
    ("tpu_vm.sh", ["--name", "a", "--zone", "us-central2-b", "--accelerator", "v3-8", "--", "x"],
     "--accelerator v3-8: expected a slice type"),
    ("tpu_vm.sh", ["--name", "a", "--zone", "us-central2-b", "--accelerator", "v4-8"], "no command to run"),
    ("tpu_vm.sh", ["--name", "a", "--zone"], "--zone needs a value"),
    ("slurm_gpu.sh", ["--nodes", "0", "--", "x"], "--nodes 0: expected a positive count"),
    ("slurm_gpu.sh", ["--nodes", "2", "--time", "5h", "--", "x"], "--time 5h: expected"),
    ("slurm_gpu.sh", ["--nodes", "2", "--venv", "/nowhere", "--", "x"], "--venv /nowhere: no bin/activate"),
    ("gpu_single_host.sh", ["--gpus", "0,a", "--", "x"], "--gpus 0,a: expected"),
    ("gpu_single_host.sh", ["--mem_fraction", "1.5", "--", "x"], "--mem_fraction 1.5: expected a fraction"),
    ("gpu_single_host.sh", ["--frobnicate"], "unknown argument --frobnicate"),
])
def test_bad_arguments_fail_in_one_line(script, args, message):
  result = _launch(script, "--dry_run", *args)  # first: a check that wrongly passed must not run anything
  assert result.returncode == 2 and not result.stdout
  assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_tpu_dry_run_creates_installs_runs_on_every_worker_and_deletes():
  result = _launch("tpu_vm.sh", "--name", "moe-v4", "--zone", "us-central2-b", "--accelerator", "v4-32", "--spot",
                   "--dry_run", "--", *TRAIN)
  assert result.returncode == 0, result.stderr
  create, archive, scp, install, execute, delete = _commands(result.stdout)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "moe-v4", "--zone", "us-central2-b",
                    "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base", "--spot"]
  assert archive == ["git", "-C", REPO, "archive", "--format=tar.gz", "-o", "/tmp/moe_jax-moe-v4.tar.gz", "HEAD"]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/moe_jax-moe-v4.tar.gz"]
  for command in (scp, install, execute):
    assert "--worker=all" in command and command[command.index("--zone") + 1] == "us-central2-b"
  assert "pip install" in install[-1]
  assert execute[-2] == "--command"
  remote = shlex.split(execute[-1])  # what each worker's shell runs: the command, word for word
  assert remote[:4] == ["cd", "moe_jax", "&&", "MOE_JAX_DISTRIBUTED=1"] and remote[4:] == TRAIN
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "moe-v4", "--zone", "us-central2-b", "--quiet"]


def test_tpu_dry_run_through_a_queued_resource_kept():
  result = _launch("tpu_vm.sh", "--name", "moe-v5", "--zone", "us-west4-a", "--accelerator", "v5litepod-16",
                   "--queued", "--project", "proj", "--keep", "--dry_run", "--", "python", "-m", "moe_jax.evaluate")
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert commands[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "moe-v5"]
  assert commands[0][commands[0].index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"
  assert commands[0][commands[0].index("--project") + 1] == "proj" and "--spot" not in commands[0]
  assert commands[1][3:5] == ["queued-resources", "describe"]  # waits for ACTIVE
  assert not any("delete" in command for command in commands)  # --keep


def test_slurm_dry_run_prints_the_batch_script_and_sbatch():
  result = _launch("slurm_gpu.sh", "--nodes", "4", "--gpus_per_node", "8", "--partition", "a100", "--requeue",
                   "--dry_run", "--", *TRAIN)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  directives = {line.split("=")[0][len("#SBATCH "):]: line.split("=", 1)[1] for line in lines
                if line.startswith("#SBATCH ") and "=" in line}
  assert directives["--nodes"] == "4" and directives["--ntasks-per-node"] == "1"
  assert directives["--gpus-per-node"] == "8" and directives["--partition"] == "a100"
  assert directives["--signal"] == "TERM@120" and "#SBATCH --requeue" in lines
  srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
  assert srun[1:] == ["--kill-on-bad-exit=1", *TRAIN]
  assert _commands(result.stdout) == [["sbatch", "runs/slurm/moe_jax.sbatch"]]


def test_single_host_gpu_dry_run():
  result = _launch("gpu_single_host.sh", "--gpus", "0,1,2,3", "--mem_fraction", "0.9", "--dry_run", "--", *TRAIN)
  assert result.returncode == 0, result.stderr
  assert _commands(result.stdout) == [["env", "MOE_JAX_DISTRIBUTED=0", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                                       "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", *TRAIN]]
