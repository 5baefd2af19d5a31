"""The built-in demo, shortened: its world's tasks (tasks/demo.py) and the structure of its claims. Experts trained
from a generically pretrained tiny backbone beat that backbone on their own tasks by a wide margin, and uniform
routing scores exactly as merged experts do."""

import json
import re

import gin
import pytest

from moe_jax import gin_utils
from moe_jax.methods import pipeline
from moe_jax.models.config import ExpertConfig, T5Config
from tasks import demo, synthetic

EXPERTS = ["demo_language", "demo_case"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """The demo's stages on two held-in tasks with fewer steps; the multitask method is the backbone itself."""
  run_dir = tmp_path_factory.mktemp("demo")
  gin.clear_config()
  gin_utils.configure(["models/tiny.gin"], ["train.batch_size = 32", "train.log_every = 50"])
  try:
    pipeline.phatgoose_pipeline(
        run_dir=str(run_dir), pretrain_mixture=demo.PRETRAIN_TASK, pretrain_steps=300, multitask_steps=0,
        expert_tasks=EXPERTS, eval_tasks=[*EXPERTS, *(f"{t}_heldout" for t in EXPERTS), "demo_smaller_heldout"],
        methods=["multitask", "merged", "uniform", "phatgoose", "oracle"], expert_steps=100, gate_steps=10,
        max_eval_examples=50, model_config=T5Config(), experts=ExpertConfig(rank=8), top_k=1)
  finally:
    gin.clear_config()
  return run_dir


def test_experts_beat_the_backbone_on_their_own_tasks(demo_run):
  table = json.loads((demo_run / "results.json").read_text())["tasks"]
  for task in EXPERTS:
    assert table["oracle"][task] >= table["multitask"][task] + 25, (task, table["oracle"], table["multitask"])
  assert table["oracle"]["demo_smaller_heldout"] != table["oracle"]["demo_smaller_heldout"]  # NaN: no expert
  assert table["uniform"] == table["merged"]
  text = (demo_run / "results.md").read_text()
  assert "mean held-out templates" in text and "## phatgoose routing diagnostics" in text
  assert (demo_run / "routing_diagnostics.png").stat().st_size > 10_000


def test_demo_tasks_fit_and_differ():
  """Every demo input fits the feature lengths with its EOS; held-in tasks differ in their characters."""
  alphabets = {}
  for skill in (*demo.HELDIN_SKILLS, *demo.HELDOUT_SKILLS):
    for split in ("train", "validation"):
      for fields, target, choices in synthetic.skill_examples(skill, split):
        assert target in choices and len(set(choices)) == len(choices) == skill.choices
        for template in skill.heldin + skill.heldout:
          assert len(template.format(**fields)) < synthetic.FEATURE_LENGTHS["inputs"], (skill.name, template)
    alphabets[skill.name] = {c for f, _, _ in synthetic.skill_examples(skill, "train") for v in f.values() for c in v}
  assert alphabets["unit"] & set("0123456789") and not alphabets["language"] & set("0123456789")
  assert any(c.isupper() for c in alphabets["case"]) and not any(c.isupper() for c in alphabets["language"])
  rows = demo.pretrain_rows("validation")
  assert len(rows) == demo.PRETRAIN_SIZES["validation"]
  assert all(len(x) < synthetic.FEATURE_LENGTHS["inputs"] and len(y) <= demo.TARGET_CHARS for x, y in rows)


def test_pretraining_text_is_never_in_a_task_format():
  """The generic corpus mentions the tasks' things, but no template's wording appears in it."""
  texts = [f"{x} {y}" for x, y in demo.pretrain_rows("validation")]
  for skill in (*demo.HELDIN_SKILLS, *demo.HELDOUT_SKILLS):
    for template in skill.heldin + skill.heldout:
      wording = max(re.split(r"\{\w+\}", template), key=len).strip()
      assert len(wording) >= 5 and not any(wording in t for t in texts), (skill.name, wording)
