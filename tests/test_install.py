"""The data stack imports as pinned in setup.py (t5 drags in nightly builds that share seqio's and TFDS's folders)."""


def test_stable_seqio_and_tfds_win():
  import seqio
  import tensorflow_datasets as tfds

  assert seqio.__version__ == "0.0.20"
  assert tfds.__version__ == "4.9.10"
  import t5.evaluation.metrics  # noqa: F401  (the metrics we use; t5.models is not importable with TF 2.21)
  assert seqio.ByteVocabulary().vocab_size == 259
