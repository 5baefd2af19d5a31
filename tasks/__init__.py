"""seqio task definitions. Importing this package registers them (`import tasks`), as T5X and T0 do."""

from tasks import synthetic  # noqa: F401  (registers the synthetic tasks and mixtures)
