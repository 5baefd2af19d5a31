"""moe_jax: modular language models (routed LoRA experts on a frozen T5) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="PHATGOOSE and friends: routing among LoRA experts on a frozen T5X-style encoder-decoder, in JAX",
    packages=find_packages(include=["moe_jax", "moe_jax.*", "tasks", "tasks.*"]),
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
    ],
    extras_require={
        "data": ["seqio", "t5", "tensorflow-datasets", "datasets", "tensorflow"],
        # transformers + CPU PyTorch are the independent reference our T5 is tested against. torch==2.13.0 is a
        # CPU build on this project's machines; an open `torch` requirement would pull a multi-GB CUDA build.
        "test": ["pytest>=8", "transformers>=4.40", "torch==2.13.0"],
    },
)
