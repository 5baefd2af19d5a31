"""Methods by name: the built-in ones are all registered, in table order; a new method is one registered builder
that the pipeline then runs like the others; a name registered twice is refused."""

import pytest

from moe_jax.errors import ConfigError
from moe_jax.methods import registry


def test_builtin_methods_are_registered_in_table_order():
  assert registry.available() == ("multitask", "uniform", "merged", "merged_factors", "ties", "phatgoose_merged",
                                  "phatgoose", "average_activation", "arrow", "retrieval", "roe", "roe_merged",
                                  "best_expert", "oracle")
  with pytest.raises(ConfigError, match=r"unknown method\(s\) \['nope'\]"):
    registry.check(["phatgoose", "nope"], "methods")


def test_a_new_method_is_one_registered_builder(monkeypatch):
  from moe_jax.models.routers import Phatgoose

  monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))  # pylint: disable=protected-access

  @registry.register("phatgoose_top1")
  def build(experts: registry.Experts) -> registry.Method:
    return experts.routed(Phatgoose(k=1))

  assert "phatgoose_top1" in registry.available()
  with pytest.raises(ValueError, match="registered twice"):
    registry.register("phatgoose_top1")(lambda experts: None)
