"""Command-line gin handling: T5X-style flags, and one clear error for each kind of mistake."""

import glob
import os

import gin
import jax.numpy as jnp
import pytest

from moe_jax import errors, gin_utils
from moe_jax.models.config import T5Config


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _configure(argv):
  args = gin_utils.parse_flags(argv, "test")
  gin_utils.configure(args.gin_file, args.gin_bindings, args.gin_search_paths)


def test_files_and_both_binding_styles():
  _configure(["--gin_file=gin/models/tiny.gin", "--gin.T5Config.d_model=48",
              "--gin_bindings=T5Config.num_heads = 2", "--gin.T5Config.name='x'"])
  cfg = T5Config()
  assert (cfg.d_model, cfg.num_heads, cfg.name, cfg.d_ff) == (48, 2, "x", 128)


def test_includes_resolve_through_search_paths():
  _configure(["--gin_file=models/flan_t5_xl.gin"])
  assert T5Config().d_model == 2048 and T5Config().name == "flan_t5_xl"


@pytest.mark.parametrize("argv,message", [
    (["--gin_file=gin/models/tiny.gin", "--gin.T5Config.d_modle=48"], "doesn't have a parameter named 'd_modle'"),
    (["--gin_file=gin/models/tiny.gin", "--gin.T5Confg.d_model=48"], "No configurable matching 'T5Confg'"),
    (["--gin_file=gin/models/nope.gin"], "gin file 'gin/models/nope.gin' not found"),
])
def test_mistakes_give_one_clear_error(argv, message):
  with pytest.raises(gin_utils.GinError) as e:
    _configure(argv)
  assert message in e.value.message and "\n" not in e.value.message


def test_flag_errors(capsys):
  with pytest.raises(SystemExit):
    gin_utils.parse_flags(["--gin.T5Config.d_model"], "test")
  with pytest.raises(SystemExit):
    gin_utils.parse_flags([], "test")
  assert "--gin_file" in capsys.readouterr().err


@gin.configurable
def _job_raising(error: Exception = gin.REQUIRED):
  raise error


@pytest.mark.parametrize("error", [errors.ConfigError("train.batch_size=3 is not divisible by 2"),
                                   errors.MissingFileError("init_from='/nowhere' does not exist"),
                                   errors.MismatchError("expert file e was trained on backbone a, not b")])
def test_user_errors_are_one_line_and_exit_1(error, capsys):
  with gin.unlock_config():
    gin.bind_parameter("_job_raising.error", error)
  with pytest.raises(SystemExit) as e:
    gin_utils.run_job(_job_raising)  # through gin's wrapper, which re-raises with its "In call to" trail
  assert e.value.code == 1
  assert capsys.readouterr().err == f"error: {error}\n"


def test_internal_errors_keep_their_traceback(capsys):
  """A ValueError from JAX or the model code is a bug, not bad input: it propagates (and Python prints its
  traceback) instead of becoming an `error:` line."""
  with pytest.raises((ValueError, TypeError), match="reshape"):
    gin_utils.run_job(lambda: jnp.ones(3).reshape(2, 2))
  with pytest.raises(ValueError, match="internal"):
    gin_utils.run_job(lambda: (_ for _ in ()).throw(ValueError("internal: name maps differ")))
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "gin", "*.gin"))))
def test_every_job_config_parses(path):
  """Each command's gin file parses with the configurables its job imports (a misspelt binding fails here)."""
  import moe_jax.evaluate  # noqa: F401  (the evaluate and train commands' configurables)
  import moe_jax.train  # noqa: F401

  _configure([f"--gin_file={path}"])
