"""The built-in demo's world: a generic pretraining corpus, eight held-in tasks, their held-out templates and three
held-out tasks, all generated (no files, no network), as a miniature of PHATGOOSE's setting.

PHATGOOSE trains its experts from a generic pretrained backbone (T5-LM-adapt) and compares with a multitask model
trained separately (T0). Here:
  demo_pretrain        prefix language modelling on mixed text that mentions the world's things (reviews' words,
                       topics, animals and their sounds, numbers, three invented languages, capitals and letters) in
                       free sentences, never in a task's format: the backbone's generic objective.
  demo_<skill>         eight held-in tasks (one expert each), which differ the way real datasets do: in vocabulary
                       (English review words, topic nouns, digits and units, invented syllables, capitals, fruit and
                       animal names), in length and in
                       format; each is a classification over its own label set, scored by rank classification.
  demo_<skill>_heldout the same examples phrased with held-out templates.
  demo_<skill>         three held-out tasks no expert is trained on (`HELDOUT_SKILLS`), each a new task on a
                       held-in task's material, as T0's held-out tasks are: a star rating of a review, the smaller of
                       two numbers, the animal that makes a sound.
The world's knowledge (which words are praise, which nouns are sports, which unit measures time, what colour a
lemon is, which animal says moo) is in the pretraining text, in both directions, as a real corpus holds it; the
tasks teach a format and a label set on top of it, as P3's datasets do for T5.
"""

from __future__ import annotations

import functools
import random

import seqio
import tensorflow as tf

from moe_jax.data.vocab import run_vocabulary
from tasks.synthetic import LETTERS, Skill, register_skills

PREFIX = "demo"
POSITIVE = ("great", "superb", "lovely", "tasty", "friendly", "fresh")
NEGATIVE = ("awful", "rude", "stale", "dirty", "slow", "bland")
REVIEWED = ("food", "service", "room", "staff", "soup", "price", "view", "bread", "coffee", "waiter", "menu", "bed")
TOPICS = {
    "sports": ("match", "goal", "coach", "team", "league", "stadium"),
    "weather": ("rain", "storm", "cloud", "snow", "sunshine", "frost"),
    "music": ("song", "guitar", "concert", "drum", "album", "piano"),
    "science": ("atom", "energy", "planet", "laboratory", "molecule", "gene"),
}
FILLERS = ("the", "a", "new", "after", "before", "with", "big", "late", "early", "local")
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "lion": "roar", "owl": "hoot",
          "horse": "neigh", "pig": "oink", "snake": "hiss", "frog": "croak", "bee": "buzz"}
NAMES = ("Anna", "Ben", "Carla", "Dev", "Ema", "Finn", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lena", "Mira", "Noor",
         "Otto", "Pia", "Raj", "Sara", "Tom", "Uma")
PLACES = ("barn", "river", "fence", "road", "hill", "pond", "gate", "field", "wood", "shed", "lake", "yard")
UNITS = {"length": ("km", "metres", "cm", "miles", "inches"), "time": ("seconds", "hours", "minutes", "days"),
         "weight": ("kg", "grams", "pounds", "tonnes")}
COLOURS = {"banana": "yellow", "lemon": "yellow", "corn": "yellow", "cherry": "red", "tomato": "red",
           "strawberry": "red", "lime": "green", "pea": "green", "cucumber": "green", "orange": "orange",
           "carrot": "orange", "pumpkin": "orange"}
# Three invented languages, each with its own syllables: a sentence's letters tell which one it is.
LANGUAGES = {"almish": ("ka", "zo", "ta", "ko", "za", "to", "kat", "zok"),
             "borish": ("mel", "ri", "le", "mi", "rel", "lim", "re", "mil"),
             "coltic": ("bu", "dy", "pu", "by", "dup", "pyb", "du", "bup")}


def _review(rng: random.Random) -> tuple[str, bool]:
  """A review of two or three clauses, all positive or all negative."""
  positive = rng.random() < 0.5
  words = POSITIVE if positive else NEGATIVE
  return ", ".join(f"{rng.choice(words)} {rng.choice(REVIEWED)}" for _ in range(rng.choice((2, 3)))), positive


def _sentiment(rng):
  text, positive = _review(rng)
  return {"x": text}, "positive" if positive else "negative", ["positive", "negative"]


def _rating(rng):
  text, positive = _review(rng)
  return {"x": text}, "5 stars" if positive else "1 star", ["5 stars", "1 star"]


def _headline(rng: random.Random, topic: str) -> str:
  words = []
  for _ in range(rng.randint(3, 4)):
    if rng.random() < 0.35:
      words.append(rng.choice(FILLERS))
    words.append(rng.choice(TOPICS[topic]))
  return " ".join(words)


def _topic(rng):
  topic = rng.choice(sorted(TOPICS))
  return {"x": _headline(rng, topic)}, topic, sorted(TOPICS)


def _number(rng: random.Random) -> str:
  return str(rng.randrange(10 ** rng.randint(1, 5), 10 ** rng.randint(6, 7)))


def _unit(rng):
  kind = rng.choice(sorted(UNITS))
  return {"n": _number(rng), "u": rng.choice(UNITS[kind])}, kind, sorted(UNITS)


def _pair(rng: random.Random) -> tuple[int, int]:
  a, b = rng.sample(range(10, 1000), 2)
  return a, b


def _larger(rng):
  a, b = _pair(rng)
  return {"a": str(a), "b": str(b)}, str(max(a, b)), [str(a), str(b)]


def _smaller(rng):
  a, b = _pair(rng)
  return {"a": str(a), "b": str(b)}, str(min(a, b)), [str(a), str(b)]


def _speech(rng: random.Random, language: str) -> str:
  syllables = LANGUAGES[language]
  return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(3, 5)))


def _language(rng):
  language = rng.choice(sorted(LANGUAGES))
  return {"x": _speech(rng, language)}, language, sorted(LANGUAGES)


def _scene(rng: random.Random) -> dict[str, str]:
  return {"name": rng.choice(NAMES), "animal": rng.choice(sorted(SOUNDS)), "place": rng.choice(PLACES)}


def _animal_sound(rng):
  fields = _scene(rng)
  sound = SOUNDS[fields["animal"]]
  return fields, sound, rng.sample([s for s in SOUNDS.values() if s != sound], 3)


def _sound_animal(rng):
  fields = _scene(rng)
  animal = fields.pop("animal")
  fields["sound"] = SOUNDS[animal]
  return fields, animal, rng.sample([a for a in SOUNDS if a != animal], 3)


def _word(rng: random.Random) -> str:
  return "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 9)))


def _colour(rng):
  fields = {"name": rng.choice(NAMES), "thing": rng.choice(sorted(COLOURS)), "place": rng.choice(PLACES)}
  return fields, COLOURS[fields["thing"]], sorted(set(COLOURS.values()))


def _case(rng):
  word, upper = _word(rng), rng.random() < 0.5
  return {"w": word.upper() if upper else word}, "upper" if upper else "lower", ["upper", "lower"]


HELDIN_SKILLS: tuple[Skill, ...] = tuple(Skill(*args, prefix=PREFIX) for args in (
    ("sentiment", _sentiment, ("{x}. Positive or negative?", "{x}\nSentiment:", "Did they like it? {x}"),
     ("How does the writer feel: {x}", "Opinion in: {x}"), 2),
    ("topic", _topic, ("Headline: {x}. Topic?", "{x}\nSection:", "Section of the paper: {x}"),
     ("What is this about? {x}", "File under a topic: {x}"), 4),
    ("unit", _unit, ("{n} {u}: length, time or weight?", "{n} {u}\nQuantity:", "What does {n} {u} measure?"),
     ("Is {n} {u} a length, a time or a weight?", "Kind of measure: {n} {u}"), 3),
    ("larger", _larger, ("Which is larger, {a} or {b}?", "{a} vs {b}\nBigger:", "Pick the bigger number: {a}, {b}"),
     ("Of {a} and {b}, which is greater?", "Which number is higher: {a} or {b}?"), 2),
    ("language", _language, ("Which language is this? {x}", "{x}\nLanguage:", "Identify the language of: {x}"),
     ("In what language was this written: {x}", "Name the language: {x}"), 3),
    ("animal", _animal_sound, ("{name} saw a {animal} by the {place}. What sound did it make?",
                               "{animal} at the {place}\nSound:", "What does the {animal} of {name} say?"),
     ("By the {place}, {name}'s {animal} went", "Which noise does a {animal} make? ({name}, {place})"), 4),
    ("case", _case, ("Is {w} written in upper or lower case?", "{w}\nCase:", "Upper or lower case: {w}"),
     ("Was {w} typed with caps lock on?", "Which case are the letters of {w} in?"), 2),
    ("colour", _colour, ("{name} ate a {thing} by the {place}. What colour was it?", "{thing}\nColour:",
                         "Which colour is the {thing} {name} bought?"),
     ("{name} found a {thing} near the {place}; its colour is", "Say the colour of a {thing}. ({name})"), 4),
))
HELDOUT_SKILLS: tuple[Skill, ...] = tuple(Skill(*args, prefix=PREFIX) for args in (
    ("rating", _rating, (), ("Review: {x}. How many stars?", "{x}\nStars:"), 2),
    ("smaller", _smaller, (), ("Which is smaller, {a} or {b}?", "{a} vs {b}\nSmaller:"), 2),
    ("which_animal", _sound_animal, (), ("{name} heard a {sound} by the {place}. Which animal was it?",
                                         "{sound} at the {place}\nAnimal:"), 4),
))
EXPERT_TASKS = tuple(f"{PREFIX}_{s.name}" for s in HELDIN_SKILLS)  # expert i trains on EXPERT_TASKS[i]
HELDOUT_TEMPLATE_TASKS = tuple(f"{t}_heldout" for t in EXPERT_TASKS)
HELDOUT_TASKS = tuple(f"{PREFIX}_{s.name}_heldout" for s in HELDOUT_SKILLS)
EVAL_TASKS = (*EXPERT_TASKS, *HELDOUT_TEMPLATE_TASKS, *HELDOUT_TASKS)
# ELM's setting (gin/roe_demo.gin): one prompt expert per held-in (skill, template), and as targets every held-out
# (skill, template): the held-in skills' new wordings and the held-out skills.
PROMPT_EXPERT_TASKS = tuple(f"{PREFIX}_{s.name}_t{i}" for s in HELDIN_SKILLS for i in range(len(s.heldin)))
PROMPT_TARGET_TASKS = tuple(f"{PREFIX}_{s.name}_heldout_t{i}" for s in (*HELDIN_SKILLS, *HELDOUT_SKILLS)
                            for i in range(len(s.heldout)))
PRETRAIN_TASK = f"{PREFIX}_pretrain"
MIXTURES = {f"{PREFIX}_heldin": EXPERT_TASKS, f"{PREFIX}_heldout_templates": HELDOUT_TEMPLATE_TASKS,
            f"{PREFIX}_heldout": HELDOUT_TASKS}
PRETRAIN_SIZES = {"train": 40_000, "validation": 1000}
TARGET_CHARS = 15  # a prefix-LM target fits `FEATURE_LENGTHS['targets']` with its EOS


def _sentence(rng: random.Random) -> str:
  """One sentence of generic text: the world's words in free prose, never in a task's template."""
  kind = rng.randrange(8)
  if kind == 0:
    text, positive = _review(rng)
    verdict = f"{rng.choice(NAMES)} {'loved' if positive else 'hated'} it"
    return rng.choice((f"{verdict}: {text}", f"{text} - {verdict}",
                       f"{text} made it a {'positive' if positive else 'negative'} stay"))
  if kind == 1:
    topic = rng.choice(sorted(TOPICS))
    return rng.choice((f"news on {topic}: {_headline(rng, topic)}", f"{_headline(rng, topic)} is {topic} news"))
  if kind == 2:
    animal = rng.choice(sorted(SOUNDS))
    return rng.choice((f"the {animal} says {SOUNDS[animal]}", f"a {animal} near the {rng.choice(PLACES)} went "
                       f"{SOUNDS[animal]}", f"{SOUNDS[animal]} said the {animal} to {rng.choice(NAMES)}"))
  if kind == 3:
    a, b = sorted(_pair(rng))
    measure, thing = rng.choice(sorted(UNITS)), rng.choice(sorted(COLOURS))
    return rng.choice((f"{a} is less than {b}", f"{b} is more than {a}",
                       f"it took {_number(rng)} {rng.choice(UNITS['time'])}",
                       f"the road was {_number(rng)} {rng.choice(UNITS['length'])} long",
                       f"it weighs {_number(rng)} {rng.choice(UNITS['weight'])}",
                       f"{rng.choice(UNITS[measure])} measure {measure}",
                       f"a {COLOURS[thing]} {thing} lay on the {rng.choice(PLACES)}",
                       f"the {thing} is {COLOURS[thing]}"))
  if kind == 4:
    language = rng.choice(sorted(LANGUAGES))
    return f"in {language} one says {_speech(rng, language)}"
  if kind == 5:
    word = _word(rng)
    return rng.choice((f"{rng.choice(NAMES)} wrote {word.upper()} in capitals", f"{word} is in lower case"))
  if kind == 6:
    animal = rng.choice(sorted(SOUNDS))
    return f"{rng.choice(NAMES)} heard {SOUNDS[animal]} and saw a {animal}"
  return f"{rng.choice(NAMES)} walked to the {rng.choice(PLACES)} with a {rng.choice(sorted(SOUNDS))}"


@functools.lru_cache(maxsize=None)
def pretrain_rows(split: str) -> tuple[tuple[str, str], ...]:
  """(prefix, continuation) pairs: each sentence cut at a word boundary, the continuation at most TARGET_CHARS."""
  if split not in PRETRAIN_SIZES:
    raise ValueError(f"Unknown split {split!r} for {PRETRAIN_TASK}; expected one of {tuple(PRETRAIN_SIZES)}")
  rng = random.Random(f"moe_jax/{PRETRAIN_TASK}/{split}")
  rows = []
  while len(rows) < PRETRAIN_SIZES[split]:
    words = _sentence(rng).split(" ")
    cuts = [i for i in range(1, len(words)) if len(" ".join(words[i:])) <= TARGET_CHARS]
    cut = rng.choice(cuts) if cuts else len(words) - 1
    rows.append((" ".join(words[:cut]), " ".join(words[cut:])[:TARGET_CHARS]))
  return tuple(rows)


def _pretrain_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  del shuffle_files, seed  # in memory: the Task shuffles its examples after this
  rows = pretrain_rows(split)
  return tf.data.Dataset.from_tensor_slices({"inputs": [x for x, _ in rows], "targets": [y for _, y in rows]})


def register(vocabulary: seqio.Vocabulary | None = None) -> None:
  """(Re-)register the pretraining task, every skill's tasks and the mixtures; the vocabulary as `synthetic`'s."""
  vocabulary = vocabulary or run_vocabulary()
  register_skills((*HELDIN_SKILLS, *HELDOUT_SKILLS), MIXTURES, vocabulary)
  seqio.TaskRegistry.remove(PRETRAIN_TASK)
  seqio.TaskRegistry.add(
      PRETRAIN_TASK, source=seqio.FunctionDataSource(_pretrain_dataset, splits=tuple(PRETRAIN_SIZES)),
      output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])


register()
