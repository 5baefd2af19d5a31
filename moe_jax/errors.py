"""The errors a user can fix: bad configuration, a missing file, a product or checkpoint that does not match the run.

Entry points (`moe_jax.gin_utils.run_job`) print these as one line and exit non-zero. Anything else, a ValueError
raised inside JAX or the model code included, is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """An input problem the message explains: what, where, and what to do."""


class ConfigError(UserError, ValueError):
  """A configuration value that cannot work (a bad binding, a size that does not divide, an unknown name)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the run needs is not there."""


class MismatchError(UserError, ValueError):
  """Two things that must belong together do not: experts and backbone, a product and the run that would remake
  it, a vocabulary and a model, a checkpoint and the run resuming it."""
