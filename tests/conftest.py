"""Shared test fixtures: the repo root on sys.path, and the session's real-scale fixtures: a data root holding every
dataset the real-scale configs name (`data_fixtures.write_pools`) and a Hugging Face T5 directory whose
`spiece.model` was trained on that data's text (`hf_fixture.write_hf_t5`)."""

import dataclasses
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


@dataclasses.dataclass(frozen=True)
class PoolData:
  root: str
  texts: frozenset


@pytest.fixture(scope="session")
def pool_data(tmp_path_factory) -> PoolData:
  import data_fixtures

  root = str(tmp_path_factory.mktemp("pools"))
  return PoolData(root, frozenset(data_fixtures.write_pools(root)))


@pytest.fixture(scope="session")
def hf_t5(tmp_path_factory, pool_data):
  import hf_fixture

  return hf_fixture.write_hf_t5(str(tmp_path_factory.mktemp("hf_t5")), sorted(pool_data.texts))
