"""Stand-ins for remote storage that keep the library's real client code path: a `gs://` filesystem that is
fsspec's memory filesystem under the gs protocol (the library reaches it through `fsspec.core.url_to_fs`, as it
reaches gcsfs), and a local Hugging Face Hub that answers the `HfApi` calls the library makes, with the real
`CommitOperationAdd`/`CommitOperationDelete` objects and the real error types."""

from __future__ import annotations

import os

from fsspec.implementations.memory import MemoryFileSystem


class FakeGCSFileSystem(MemoryFileSystem):
  """gs:// in memory: `fsspec.register_implementation("gs", FakeGCSFileSystem, clobber=True)`."""

  protocol = ("gs", "gcs")
  store: dict = {}  # its own, apart from memory://
  pseudo_dirs = [""]


def hub_error(cls: type, status: int, url: str, message: str = "") -> Exception:
  """A huggingface_hub error as the client raises it: with the HTTP response of its own HTTP library."""
  try:
    import httpx2 as http  # huggingface_hub >= 2
  except ImportError:
    import httpx as http
  response = http.Response(status, request=http.Request("GET", url))
  return cls(message or f"{status} Client Error for url {url}", response=response)


class FakeHubApi:
  """A Hub repository per repo_id, kept in a local folder; counts commits and remembers their messages."""

  def __init__(self, root: str):
    self.root = root
    self.commits: list[tuple[str, str, list[str]]] = []  # (repo_id, message, paths)

  def _repo(self, repo_id: str) -> str:
    return os.path.join(self.root, repo_id.replace("/", "--"))

  def create_repo(self, repo_id: str, repo_type: str = "model", exist_ok: bool = False, private: bool = False):
    os.makedirs(self._repo(repo_id), exist_ok=True)

  def list_repo_files(self, repo_id: str, repo_type: str = "model") -> list[str]:
    from huggingface_hub import errors
    root = self._repo(repo_id)
    if not os.path.isdir(root):
      raise hub_error(errors.RepositoryNotFoundError, 404, f"https://huggingface.co/api/models/{repo_id}")
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, files in os.walk(root) for f in files)

  def hf_hub_download(self, repo_id: str, filename: str, repo_type: str = "model") -> str:
    return os.path.join(self._repo(repo_id), *filename.split("/"))

  def create_commit(self, repo_id: str, operations, commit_message: str, repo_type: str = "model"):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    root = self._repo(repo_id)
    paths = []
    for op in operations:
      path = os.path.join(root, *op.path_in_repo.split("/"))
      if isinstance(op, CommitOperationAdd):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        source = op.path_or_fileobj
        data = source.getvalue() if hasattr(source, "getvalue") else open(source, "rb").read()
        with open(path, "wb") as f:
          f.write(data)
      elif isinstance(op, CommitOperationDelete):
        os.remove(path)
      paths.append(op.path_in_repo)
    self.commits.append((repo_id, commit_message, paths))
