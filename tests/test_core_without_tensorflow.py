"""The core (models, routing, training step, checkpoints) imports and runs with TensorFlow and seqio unavailable."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys

    class Block:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "seqio", "t5", "tensorflow_datasets"):
          raise ImportError(f"blocked: {name}")

    sys.meta_path.insert(0, Block())
    import jax, jax.numpy as jnp, numpy as np
    import moe_jax.models, moe_jax.checkpoints.hf, moe_jax.checkpoints.peft, moe_jax.evaluation.scoring
    import moe_jax.library.__main__, moe_jax.library.interop, moe_jax.checkpoints.hf_causal, moe_jax.checkpoints.t5x
    import moe_jax.models.causal, moe_jax.models.decoding, moe_jax.models.interface
    from moe_jax.models import ExpertConfig, Phatgoose, T5Config, Transformer
    from moe_jax.models import experts as ex
    from moe_jax.training import checkpointing, optimizer, partitioning, train_step
    cfg = T5Config(vocab_size=32, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                   num_decoder_layers=1, dtype="float32")
    model = Transformer(cfg, ExpertConfig(num_experts=1, rank=2))
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules()
    params = jax.tree.map(np.asarray, __import__("flax").linen.meta.unbox(
        model.init(jax.random.PRNGKey(0), jnp.ones((2, 4), jnp.int32), jnp.ones((2, 3), jnp.int32)))["params"])
    opt = optimizer.make_optimizer("expert", partitioning.abstract_params(model), total_steps=2)
    state = train_step.create_train_state(params, model, opt, mesh, rules)
    step = train_step.make_train_step(model, opt, "expert", mesh, rules)
    batch = {"encoder_input_tokens": np.ones((2, 4), np.int32), "decoder_input_tokens": np.ones((2, 3), np.int32),
             "decoder_target_tokens": np.ones((2, 3), np.int32), "decoder_loss_weights": np.ones((2, 3), np.int32)}
    state, metrics = step(state, partitioning.shard_batch(batch, mesh, rules))
    assert np.isfinite(float(metrics["loss"]))
    from moe_jax.library import ExpertInfo, ExpertLibrary, make_expert  # the library stores and stacks experts
    library = ExpertLibrary("virtual://no-tensorflow")
    library.add(make_expert(ExpertInfo("a"), ex.split(params)[1]))
    assert library.stack(["a"])[1]["num_experts"] == 1
    from moe_jax.data.vocab import VocabSpec  # a backbone's vocabulary size, checked when it loads
    assert VocabSpec(extra_ids=5).size == 264
    from moe_jax.methods import registry  # every method's module (their data reads import seqio when called)
    assert "roe" in registry.available() and "arrow" in registry.available()
    assert not any(m.split(".")[0] in ("tensorflow", "seqio") for m in sys.modules)
    print("ok")
""")


def test_core_runs_without_tensorflow():
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
