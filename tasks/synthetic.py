"""Built-in synthetic seqio tasks: deterministic string and arithmetic skills, no network and no data files.

Each skill (reverse, sort, ...) draws its examples from a seeded Python generator, disjoint across train, validation
and test, and is registered twice: `synthetic_<skill>` phrases every example with one of its held-in prompt
templates (training; one expert per skill in the PHATGOOSE demo) and `synthetic_<skill>_heldout` phrases the same
examples with held-out templates no expert trained on (zero-shot evaluation). Every example also carries
`answer_choices`: the target plus three near-miss distractors in a per-example shuffled order, so one task can be
scored by generation (exact match) and by rank classification (accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import string
from typing import Any, Callable, Sequence

import seqio
import tensorflow as tf
from t5.evaluation import metrics

from moe_jax.data.vocab import run_vocabulary

SPLIT_SIZES = {"test": 200, "validation": 200, "train": 2000}
NUM_CHOICES = 4
# Lengths that truncate no example with the byte vocabulary (longest: 77 input and 11 target tokens with EOS).
FEATURE_LENGTHS = {"inputs": 80, "targets": 16}
LETTERS = string.ascii_lowercase
VOWELS = "aeiou"

Sample = tuple[dict[str, str], str, list[str]]  # template fields, target, distractor candidates


@dataclasses.dataclass(frozen=True)
class Skill:
  name: str
  sample: Callable[[random.Random], Sample]
  heldin: tuple[str, ...]
  heldout: tuple[str, ...]
  choices: int = NUM_CHOICES  # answer choices per example (a classification skill: its number of labels)
  prefix: str = "synthetic"  # tasks are <prefix>_<name> and <prefix>_<name>_heldout


def _word(rng: random.Random, lo: int, hi: int, alphabet: Sequence[str] = LETTERS) -> str:
  return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _swap(s: str, rng: random.Random) -> str:
  """Swap two neighbouring characters: a near miss that keeps the multiset of characters."""
  i = rng.randrange(len(s) - 1)
  return s[:i] + s[i + 1] + s[i] + s[i + 2:]


def _near_miss(s: str, rng: random.Random) -> str:
  """Change one character to another of the same class (digit, lower, upper, other), so numbers stay numbers."""
  i = rng.randrange(len(s))
  pool = next((p for p in (string.digits, LETTERS, string.ascii_uppercase) if s[i] in p), LETTERS)
  return s[:i] + rng.choice([c for c in pool if c != s[i]]) + s[i + 1:]


def _shift(s: str, k: int) -> str:
  return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)


def _reverse(rng):
  x = _word(rng, 3, 8)
  y = x[::-1]
  return {"x": x}, y, [x, y[1:] + y[0], _swap(y, rng)]


def _sort(rng):
  x = _word(rng, 4, 8)
  y = "".join(sorted(x))
  return {"x": x}, y, [x, y[::-1], _swap(y, rng)]


def _uppercase(rng):
  x = _word(rng, 3, 8)
  y = x.upper()
  i = rng.randrange(len(y))
  return {"x": x}, y, [x, x.capitalize(), y[:i] + y[i].lower() + y[i + 1:]]


def _add(rng):
  a, b = rng.randrange(100), rng.randrange(100)
  s = a + b
  return {"a": str(a), "b": str(b)}, str(s), [str(s + 1), str(abs(s - 1)), str(s + 10), str(abs(a - b))]


def _caesar(rng):
  x, k = _word(rng, 3, 8), rng.randint(1, 3)
  return {"x": x, "k": str(k)}, _shift(x, k), [x, _shift(x, k + 1), _shift(x, -k), _shift(x, k - 1)]


def _dedupe(rng):
  alphabet = rng.sample(LETTERS, 5)
  while True:
    x = _word(rng, 5, 10, alphabet)
    y = "".join(dict.fromkeys(x))
    if len(y) < len(x):
      break
  keep_last = "".join(reversed(dict.fromkeys(reversed(x))))
  runs = "".join(c for c, _ in itertools.groupby(x))
  return {"x": x}, y, [x, keep_last, runs, "".join(sorted(y))]


def _count(rng):
  alphabet = rng.sample(LETTERS, 4)
  x, c = _word(rng, 4, 9, alphabet), alphabet[0]
  n = x.count(c)
  return {"x": x, "c": c}, str(n), [str(n + 1), str(abs(n - 1)), str(n + 2), str(len(x))]


def _vowels(rng):
  while True:
    x = _word(rng, 4, 9)
    y = "".join(c for c in x if c not in VOWELS)
    if y and len(y) < len(x):
      break
  keep = rng.choice([i for i, c in enumerate(x) if c in VOWELS])
  one_left = "".join(c for i, c in enumerate(x) if c not in VOWELS or i == keep)
  return {"x": x}, y, [x, "".join(c for c in x if c in VOWELS), one_left]


SKILLS: tuple[Skill, ...] = (
    Skill("reverse", _reverse,
          ("Reverse the string: {x}", 'Write "{x}" backwards.', "{x}\nReversed:"),
          ("What do you get if you read {x} from right to left?", "Spell {x} in reverse order.")),
    Skill("sort", _sort,
          ("Sort the letters of {x} alphabetically.", "Arrange in alphabetical order: {x}", "{x}\nSorted:"),
          ("Put the characters of {x} in order from a to z.", "Rearrange {x} so its letters are alphabetical.")),
    Skill("uppercase", _uppercase,
          ("Convert to uppercase: {x}", "Write {x} in capital letters.", "{x}\nUppercase:"),
          ("Shout this word: {x}", "Change every letter of {x} to upper case.")),
    Skill("add", _add,
          ("What is {a} plus {b}?", "{a} + {b} =", "Add {a} and {b}."),
          ("Compute the sum of {a} and {b}.", "If you have {a} apples and get {b} more, how many do you have?")),
    Skill("caesar", _caesar,
          ("Shift each letter of {x} forward by {k}.", "Caesar cipher, shift {k}: {x}",
           "Encode {x} by moving every letter {k} places along the alphabet."),
          ("Apply a rotation of {k} to the letters of {x}.",
           "Replace each letter in {x} with the letter {k} positions after it.")),
    Skill("dedupe", _dedupe,
          ("Remove repeated letters from {x}.", "Keep only the first occurrence of each letter: {x}",
           "{x}\nWithout duplicates:"),
          ("Write each distinct letter of {x} once, in order of first appearance.",
           "Delete every letter of {x} that already appeared earlier.")),
    Skill("count", _count,
          ("How many times does {c} appear in {x}?", "Count the letter {c} in {x}.", "{x}\nNumber of {c}:"),
          ("In the string {x}, how often does the letter {c} occur?", "Tell me the number of {c}'s in {x}.")),
    Skill("vowels", _vowels,
          ("Remove the vowels from {x}.", "Delete every a, e, i, o and u in {x}.", "{x}\nWithout vowels:"),
          ("Write {x} using only its consonants.", "Strip all vowels out of {x}.")),
)
SKILL_NAMES = tuple(s.name for s in SKILLS)
EXPERT_TASKS = tuple(f"synthetic_{s}" for s in SKILL_NAMES)  # expert i trains on EXPERT_TASKS[i]
HELDOUT_TASKS = tuple(f"{t}_heldout" for t in EXPERT_TASKS)
MIXTURES = {"synthetic_heldin": EXPERT_TASKS, "synthetic_heldout": HELDOUT_TASKS}


def _example(skill: Skill, rng: random.Random) -> tuple[dict[str, str], str, list[str]]:
  """Fields, target and `skill.choices` distinct answer choices (target included) in a shuffled order."""
  fields, target, candidates = skill.sample(rng)
  rng.shuffle(candidates)
  distractors = list(dict.fromkeys(c for c in candidates if c and c != target))
  while len(distractors) < skill.choices - 1:  # degenerate inputs (palindromes, ...) collapse some near misses
    miss = _near_miss(target, rng)
    if miss not in distractors:
      distractors.append(miss)
  choices = [target] + distractors[:skill.choices - 1]
  rng.shuffle(choices)
  return fields, target, choices


def raw_examples(skill_name: str, split: str) -> tuple[tuple[dict[str, str], str, list[str]], ...]:
  """The split's examples of one of this module's skills (see `skill_examples`)."""
  return skill_examples(SKILLS[SKILL_NAMES.index(skill_name)], split)


@functools.lru_cache(maxsize=None)
def skill_examples(skill: Skill, split: str) -> tuple[tuple[dict[str, str], str, list[str]], ...]:
  """The split's examples, deterministic (seeded by the skill's name) and disjoint from the other splits."""
  rng = random.Random(f"moe_jax/{skill.prefix}/{skill.name}")
  seen, examples = set(), []
  while len(examples) < sum(SPLIT_SIZES.values()):
    example = _example(skill, rng)
    key = tuple(sorted(example[0].items()))
    if key not in seen:
      seen.add(key)
      examples.append(example)
  start = 0
  for name, size in SPLIT_SIZES.items():
    if name == split:
      return tuple(examples[start:start + size])
    start += size
  raise ValueError(f"Unknown split {split!r} for {skill.prefix}_{skill.name}; expected one of {tuple(SPLIT_SIZES)}")


def _dataset_fn(skill: Skill, templates: tuple[str, ...]) -> Callable[..., tf.data.Dataset]:
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # an in-memory list: the Task shuffles its examples after this
    rows = skill_examples(skill, split)
    return tf.data.Dataset.from_tensor_slices({
        # Templates in turn: every template is used equally often in every split.
        "inputs": [templates[i % len(templates)].format(**f) for i, (f, _, _) in enumerate(rows)],
        "targets": [t for _, t, _ in rows],
        "answer_choices": [c for _, _, c in rows],
    })

  return dataset_fn


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target (t5's `sequence_accuracy`, named for what it is here)."""
  return {"exact_match": metrics.sequence_accuracy(targets, predictions)["sequence_accuracy"]}


def oracle_routing_ids(task_name: str, examples: Sequence[Any]) -> list[int]:
  """`routing_ids_fn` for oracle routing: every example to the expert trained on its skill (`Fixed()` router)."""
  skill = task_name.removeprefix("synthetic_").removesuffix("_heldout")
  return [SKILL_NAMES.index(skill)] * len(examples)


def register(vocabulary: seqio.Vocabulary | None = None) -> None:
  """(Re-)register every synthetic task and mixture; safe to call again, e.g. with a fixed vocabulary.

  The default is the run's vocabulary (`moe_jax.data.vocab.run_vocabulary`), resolved when the data is read.
  """
  register_skills(SKILLS, MIXTURES, vocabulary)


def task_templates(skill: Skill) -> dict[str, tuple[str, ...]]:
  """{task name: its templates} of a skill: `<prefix>_<name>` (the held-in templates in turn) and
  `<prefix>_<name>_heldout` (the held-out ones), and one task per template, `<prefix>_<name>_t<i>` and
  `<prefix>_<name>_heldout_t<i>`: the (dataset, prompt) tasks of ELM's prompt experts and targets."""
  out = {}
  for name, templates in ((f"{skill.prefix}_{skill.name}", skill.heldin),
                          (f"{skill.prefix}_{skill.name}_heldout", skill.heldout)):
    out[name] = templates
    out.update({f"{name}_t{i}": (template,) for i, template in enumerate(templates)})
  return out


def register_skills(skills: Sequence[Skill], mixtures: dict[str, Sequence[str]],
                    vocabulary: seqio.Vocabulary | None = None) -> None:
  """(Re-)register each skill's held-in and held-out tasks (a skill without templates of a kind has no such task)
  and the mixtures of them."""
  vocabulary = vocabulary or run_vocabulary()
  features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
  for name in mixtures:
    seqio.MixtureRegistry.remove(name)
  for skill in skills:
    for name, templates in task_templates(skill).items():
      seqio.TaskRegistry.remove(name)
      if templates:
        seqio.TaskRegistry.add(
            name,
            # No num_input_examples: seqio would cache these in-memory lists again, and warn on every partial read.
            source=seqio.FunctionDataSource(_dataset_fn(skill, templates), splits=tuple(SPLIT_SIZES)),
            output_features=features,
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
            metric_fns=[exact_match, metrics.rank_classification])
  for name, tasks in mixtures.items():
    seqio.MixtureRegistry.add(name, tasks, default_rate=1.0)


register()
