"""seqio data layer: vocabularies, training batches and evaluation examples.

This package's `__init__` stays free of TensorFlow so `import moe_jax.data` is cheap; the submodules that need
seqio (`pipeline`) import it themselves, and `vocab` imports it only when a vocabulary is built.
"""
