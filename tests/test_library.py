"""The expert library: its operations, auxiliary data, every backend, crash safety, concurrency, corruption,
read-only use, credentials and the command line."""

import json
import os
import subprocess
import sys
import textwrap

import fsspec
import numpy as np
import pytest

from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.library import (CorruptExpertError, ExpertInfo, ExpertLibrary, ReadOnlyError, backends, copy_library,
                             make_expert)
from tests.library_fakes import FakeGCSFileSystem, FakeHubApi, hub_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("encoder/layers_0/attention/query", "decoder/layers_0/mlp/wo")
BACKBONE = {"model": "tiny", "fingerprint": "f00d", "weights": "0123456789abcdef", "source": "test",
            "vocabulary": {"kind": "byte"}}


def weights(seed: int, rank: int = 2, d: int = 4) -> dict:
  rng = np.random.default_rng(seed)
  tree = {}
  for path in MODULES:
    node = tree
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node.update(lora_a=rng.normal(size=(1, d, rank)).astype(np.float32),
                lora_b=rng.normal(size=(1, rank, d)).astype(np.float32),
                router=rng.normal(size=(1, d)).astype(np.float32))
  return tree


def expert(name: str, seed: int = 0, **info):
  return make_expert(ExpertInfo(name, tasks=[name.split("/")[-1]], backbone=BACKBONE, **info), weights(seed))


def same_tree(a, b) -> bool:
  import flax
  fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
  api = FakeHubApi(str(tmp_path / "hub"))
  monkeypatch.setattr(backends, "hub_api_factory", lambda: api)
  return api


@pytest.fixture
def fake_gcs():
  fsspec.register_implementation("gs", FakeGCSFileSystem, clobber=True)
  FakeGCSFileSystem.store.clear()
  yield
  FakeGCSFileSystem.store.clear()


def uris(tmp_path):
  return {"local": f"local://{tmp_path}/lib", "virtual": f"virtual://{tmp_path.name}", "gs": "gs://bucket/lib",
          "hf": "hf://user/lib"}


@pytest.mark.parametrize("backend", ["local", "virtual", "gs", "hf"])
def test_operations_on_every_backend(tmp_path, backend, fake_hub, fake_gcs):
  library = ExpertLibrary(uris(tmp_path)[backend])
  assert library.names() == []
  library.add(expert("p3/ag_news", 0, tags=["p3"]))
  library.add(expert("sentiment", 1))
  assert library.names() == ["p3/ag_news", "sentiment"]  # a name with `/` lists and loads
  assert same_tree(library.get("p3/ag_news").weights, weights(0))
  info = library.info("p3/ag_news")
  assert info.backbone == BACKBONE and info.rank == 2 and info.tags == ("p3",) and info.tasks == ("ag_news",)
  assert info.modules == "decoder/layers_0/mlp/wo|encoder/layers_0/attention/query"
  assert library.select(tags=["p3"]) == ["p3/ag_news"]
  with pytest.raises(ConfigError, match="already has an expert 'sentiment'"):
    library.add(expert("sentiment", 2))

  library.remove("sentiment")
  assert library.names() == ["p3/ag_news"] and library.names(include_removed=True) == ["p3/ag_news", "sentiment"]
  with pytest.raises(MissingFileError, match="was removed"):
    library.get("sentiment")
  library.restore("sentiment")
  assert same_tree(library.get("sentiment").weights, weights(1))

  library.rename("sentiment", "tasks/sentiment")
  assert library.names() == ["p3/ag_news", "tasks/sentiment"]
  assert library.info("tasks/sentiment").name == "tasks/sentiment"
  library.replace(expert("tasks/sentiment", 3))
  assert same_tree(library.get("tasks/sentiment").weights, weights(3))
  library.remove("p3/ag_news", purge=True)
  assert library.names(include_removed=True) == ["tasks/sentiment"]
  # another handle on the same storage sees the same library
  again = ExpertLibrary(uris(tmp_path)[backend], read_only=True)
  assert again.names() == ["tasks/sentiment"] and same_tree(again.get("tasks/sentiment").weights, weights(3))


def test_hub_commits_once_per_change_and_once_per_copy(tmp_path, fake_hub):
  library = ExpertLibrary("hf://user/lib")
  library.add(expert("a", 0))
  assert len(fake_hub.commits) == 1  # weights, manifest and the library marker in one commit
  assert sorted(fake_hub.commits[0][2]) == ["blobs/" + library._entry("a").sha256 + ".safetensors",
                                            "entries/a.json", "library.json"]
  local = ExpertLibrary(f"local://{tmp_path}/src")
  for i, name in enumerate(["x", "y", "z"]):
    local.add(expert(name, 10 + i))
    local.put_auxiliary(name, "arrow", {"k": 1}, {"prototypes": np.full((2, 3), i, np.float32)})
  commits = len(fake_hub.commits)
  assert copy_library(local.uri, "hf://user/lib") == ["x", "y", "z"]
  assert len(fake_hub.commits) == commits + 1
  assert ExpertLibrary("hf://user/lib").get_auxiliary("y", "arrow", {"k": 1})["prototypes"][0, 0] == 1


def test_names_are_checked():
  for bad in ["", "a//b", "/a", "a/", "a b", "../x", "a/../b", "x" * 201, ".hidden", "a\\b"]:
    with pytest.raises(ConfigError, match="expert name"):
      ExpertInfo(bad)
  for good in ["p3/ag_news", "flan:cot_gsm8k", "a.b-c_d+e=f@g,h"]:
    assert ExpertInfo(good).name == good


def test_auxiliary_data_is_computed_once_kept_on_rename_dropped_on_replace_and_copied(tmp_path):
  library = ExpertLibrary(f"local://{tmp_path}/lib")
  library.add(expert("a", 0))
  calls = []

  def compute():
    calls.append(1)
    return {"vectors": np.arange(6, dtype=np.float32).reshape(2, 3)}

  first = library.auxiliary("a", "average_activation", {"examples": 8}, compute)
  again = library.auxiliary("a", "average_activation", {"examples": 8}, compute)
  assert len(calls) == 1 and np.array_equal(first["vectors"], again["vectors"])
  library.auxiliary("a", "average_activation", {"examples": 16}, compute)  # other parameters: another entry
  assert len(calls) == 2
  assert sorted(e["params"]["examples"] for e in library.auxiliary_entries("a")) == [8, 16]

  library.rename("a", "b")  # the weights did not change: their data stays
  assert library.get_auxiliary("b", "average_activation", {"examples": 8}) is not None
  copy_library(library.uri, f"local://{tmp_path}/copy")
  copied = ExpertLibrary(f"local://{tmp_path}/copy")
  assert np.array_equal(copied.get_auxiliary("b", "average_activation", {"examples": 8})["vectors"],
                        first["vectors"])
  library.replace(expert("b", 5))  # new weights: the old data no longer applies
  assert library.get_auxiliary("b", "average_activation", {"examples": 8}) is None
  assert library.auxiliary_entries("b") == []


def test_read_only_libraries_refuse_writes(tmp_path):
  ExpertLibrary(f"local://{tmp_path}/lib").add(expert("a"))
  library = ExpertLibrary(f"local://{tmp_path}/lib", read_only=True)
  for write in (lambda: library.add(expert("b")), lambda: library.remove("a"), lambda: library.rename("a", "c"),
                lambda: library.put_auxiliary("a", "x", {}, {"v": np.zeros(1)})):
    with pytest.raises(ReadOnlyError, match="read-only"):
      write()
  assert library.names() == ["a"]
  with pytest.raises(ReadOnlyError):
    copy_library(f"local://{tmp_path}/lib", library)


def test_corrupt_or_truncated_weights_are_reported_by_name(tmp_path):
  library = ExpertLibrary(f"local://{tmp_path}/lib")
  library.add(expert("good", 0))
  library.add(expert("bad", 1))
  blob = tmp_path / "lib" / library._entry("bad").blob
  data = blob.read_bytes()
  blob.write_bytes(data[:len(data) // 2])
  with pytest.raises(CorruptExpertError, match="expert 'bad'.*corrupt or truncated"):
    library.get("bad")
  blob.write_bytes(data[:-4] + b"\0\0\0\0")  # same size, other bytes
  with pytest.raises(CorruptExpertError, match="expert 'bad'"):
    library.get("bad")
  with pytest.raises(CorruptExpertError, match="expert 'bad'"):  # a copy does not spread it
    copy_library(library.uri, f"local://{tmp_path}/copy")
  assert same_tree(library.get("good").weights, weights(0))
  (tmp_path / "lib" / "entries" / "good.json").write_text("{not json")
  with pytest.raises(CorruptExpertError, match="expert 'good'.*manifest"):
    library.get("good")


_ADD_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.test_library import expert
    from moe_jax.library import ExpertLibrary
    uri, names, point, count, seed = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    calls = [0]
    def dying(original):
      def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
          os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
      return call
    if point == "fsync":  # killed after a file's bytes are written, before it is renamed into place
      os.fsync = dying(os.fsync)
    elif point == "replace":  # killed when a file is about to appear
      os.replace = dying(os.replace)
    library = ExpertLibrary(uri)
    for i, name in enumerate(names):
      library.add(expert(name, seed + i))
    print("done")
    """)


def _add_in_subprocess(uri, names, point="none", count=0, seed=100):
  script = _ADD_SCRIPT.format(repo=REPO)
  return subprocess.Popen([sys.executable, "-c", script, uri, ",".join(names), point, str(count), str(seed)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_an_add_killed_at_any_point_leaves_the_previous_experts(tmp_path):
  uri = f"local://{tmp_path}/lib"
  ExpertLibrary(uri).add(expert("before", 7))
  for attempt, (point, count) in enumerate([(p, c) for p in ("fsync", "replace") for c in (1, 2)]):
    # count 1: the weights file, 2: the manifest (the marker exists already); new weights each time, so that no
    # earlier attempt's weights file is there already
    process = _add_in_subprocess(uri, ["new"], point, count, seed=200 + attempt)
    process.wait(timeout=120)
    assert process.returncode == -9, process.stderr.read()
    library = ExpertLibrary(uri)
    assert library.names(include_removed=True) == ["before"]
    assert same_tree(library.get("before").weights, weights(7))
  process = _add_in_subprocess(uri, ["new"])  # and the next add works, over whatever the killed ones left
  assert process.wait(timeout=120) == 0, process.stderr.read()
  assert ExpertLibrary(uri).names() == ["before", "new"]
  assert same_tree(ExpertLibrary(uri).get("new").weights, weights(100))


def test_two_processes_adding_at_once_both_land(tmp_path):
  uri = f"local://{tmp_path}/lib"
  first = _add_in_subprocess(uri, [f"a{i}" for i in range(6)])
  second = _add_in_subprocess(uri, [f"b{i}" for i in range(6)])
  for process in (first, second):
    assert process.wait(timeout=180) == 0, process.stderr.read()
  library = ExpertLibrary(uri)
  assert library.names() == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)])
  assert all(same_tree(library.get(f"{p}{i}").weights, weights(100 + i)) for p in "ab" for i in range(6))


def test_hub_errors_name_the_repository_and_never_the_token(tmp_path, monkeypatch):
  secret = "hf_FAKEtoken0123456789SECRET"
  monkeypatch.setenv("HF_TOKEN", secret)

  class Refusing(FakeHubApi):
    def create_commit(self, repo_id, **kwargs):
      raise hub_error(__import__("huggingface_hub").errors.HfHubHTTPError, 403,
                      f"https://huggingface.co/api/models/{repo_id}/commit/main",
                      f"403 Forbidden: token {secret} has no write access")

  api = Refusing(str(tmp_path / "hub"))
  monkeypatch.setattr(backends, "hub_api_factory", lambda: api)
  library = ExpertLibrary("hf://user/lib")
  with pytest.raises(backends.StorageError) as error:
    library.add(expert("a"))
  assert "hf://user/lib" in str(error.value) and "403" in str(error.value) and secret not in str(error.value)
  monkeypatch.setattr(backends, "hub_api_factory", lambda: FakeHubApi(str(tmp_path / "hub")))
  library = ExpertLibrary("hf://user/lib")
  library.add(expert("a"))
  stored = [open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tmp_path / "hub") for f in fs]
  assert stored and not any(secret.encode() in data for data in stored)


def test_the_real_hub_client_reads_the_token_from_the_environment(monkeypatch):
  """No credential passes through moe_jax: HfApi() finds HF_TOKEN itself."""
  from huggingface_hub.utils import get_token
  monkeypatch.setenv("HF_TOKEN", "hf_FAKEtoken0123456789SECRET")
  backends.default_hub_api()
  assert get_token() == "hf_FAKEtoken0123456789SECRET"


def test_stack_orders_experts_and_refuses_other_backbones(tmp_path):
  library = ExpertLibrary(f"virtual://{tmp_path.name}-stack")
  library.add(expert("a", 0))
  library.add(expert("b", 1))
  tree, metadata = library.stack(["b", "a"])
  assert [e["task"] for e in metadata["experts"]] == ["b", "a"] and metadata["num_experts"] == 2
  np.testing.assert_array_equal(tree["decoder"]["layers_0"]["mlp"]["wo"]["lora_a"][0],
                                weights(1)["decoder"]["layers_0"]["mlp"]["wo"]["lora_a"][0])
  other = make_expert(ExpertInfo("c", backbone={**BACKBONE, "weights": "ffff"}), weights(2))
  library.add(other)
  with pytest.raises(MismatchError, match="one MoE holds one backbone's experts"):
    library.stack(["a", "c"])


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "moe_jax.library", *args], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, **(env or {})}, timeout=120)


def test_command_line(tmp_path):
  uri = f"local://{tmp_path}/lib"
  library = ExpertLibrary(uri)
  library.add(expert("p3/ag_news", 0, tags=["p3"]))
  library.add(expert("sentiment", 1))
  listed = _cli("list", uri)
  assert listed.returncode == 0, listed.stderr
  lines = listed.stdout.splitlines()
  assert lines[0].split() == ["name", "task", "rank", "modules", "backbone", "size"]
  assert lines[2].split()[:4] == ["p3/ag_news", "ag_news", "2", "2"] and "tiny 01234567" in lines[2]
  rows = json.loads(_cli("list", uri, "--json", "--tag", "p3").stdout)
  assert [r["name"] for r in rows] == ["p3/ag_news"] and rows[0]["size"] == library._entry("p3/ag_news").size
  shown = json.loads(_cli("show", uri, "sentiment").stdout)
  assert shown["name"] == "sentiment" and shown["auxiliary"] == []
  assert _cli("copy", uri, f"local://{tmp_path}/copy").returncode == 0
  assert ExpertLibrary(f"local://{tmp_path}/copy").names() == ["p3/ag_news", "sentiment"]
  assert _cli("remove", uri, "sentiment").returncode == 0
  assert library.names() == ["p3/ag_news"]
  assert "removed" in _cli("list", uri, "--removed").stdout.splitlines()[0]
  assert _cli("restore", uri, "sentiment").returncode == 0 and library.names() == ["p3/ag_news", "sentiment"]
  assert _cli("rename", uri, "sentiment", "s2").returncode == 0 and "s2" in library.names()
  missing = _cli("show", uri, "nope")
  assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "has no expert 'nope'" in missing.stderr
  bad = _cli("rename", uri, "s2", "a b")
  assert bad.returncode == 1 and "expert name 'a b'" in bad.stderr and "Traceback" not in bad.stderr


def test_an_unreachable_hub_is_one_line_that_names_the_library_not_the_token():
  secret = "hf_FAKEtoken0123456789SECRET"
  done = _cli("list", "hf://user/lib", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": secret})
  assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
  assert "hf://user/lib" in done.stderr and "cannot reach the Hub" in done.stderr and secret not in done.stderr


def test_a_failing_object_store_is_one_line_that_names_the_library(fake_gcs):
  class Forbidden(FakeGCSFileSystem):
    def cat_file(self, path, *args, **kwargs):
      raise PermissionError(403, "Forbidden: caller does not have storage.objects.get access")

  ExpertLibrary("gs://bucket/lib").add(expert("a"))
  fsspec.register_implementation("gs", Forbidden, clobber=True)
  try:
    with pytest.raises(backends.StorageError, match=r"gs://bucket/lib: read library.json failed .*Forbidden"):
      ExpertLibrary("gs://bucket/lib", read_only=True).get("a")
  finally:
    fsspec.register_implementation("gs", FakeGCSFileSystem, clobber=True)
