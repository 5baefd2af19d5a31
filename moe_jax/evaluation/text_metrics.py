"""Generation metrics, each on a 0-100 scale: corpus BLEU, ROUGE-1/2/L/Lsum and SARI.

Every function takes `predictions` (one string per example) and `references` (per example one string or a list of
acceptable strings); SARI also takes `sources`, the sentences the predictions rewrite.

  BLEU   sacrebleu's corpus BLEU with its defaults (13a tokenization, exponential smoothing, case-sensitive): n-gram
         counts summed over the corpus, then one score, the number WMT reports. Examples may have different numbers
         of references.
  ROUGE  Google's `rouge-score`: F-measure with the Porter stemmer on (ELM's setting; the library's own default is
         off), per example against its best reference, then the mean. rougeLsum treats each line as a sentence.
  SARI   Xu et al. (2016) as the `evaluate` library's `sari` metric computes it (tensor2tensor's version: 0/0 counts
         as 1, and the fixed keep recall). `evaluate` fetches that metric's code from the Hugging Face Hub and no
         maintained package on PyPI provides it, so it is implemented here; tests/test_text_metrics.py checks it
         against the published values. One difference: an empty prediction has no n-grams here, where `evaluate`
         would count one empty token.

seqio metric fns (`bleu_metric`, `rouge_metric`, `sari_metric`) take `(targets, predictions)` as seqio passes them,
a target being what the task's postprocess_fn made of it: a string, a list of references (`tasks.common.references`)
or a mapping with "references". seqio passes metric fns no inputs, so SARI's source rides in the target:
`sari_target` is the postprocess_fn of SARI tasks, turning a target into {"references": [...], "source": str} from
the example's `references` and `source` fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

References = Union[str, Sequence[str]]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SARI_MAX_ORDER = 4


def _reference_lists(predictions: Sequence[str], references: Sequence[References]) -> list[list[str]]:
  """Each example's references as a non-empty list, checked against the predictions."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
  if not predictions:
    raise ValueError("no predictions to score")
  lists = [[r] if isinstance(r, str) else list(r) for r in references]
  empty = [i for i, refs in enumerate(lists) if not refs]
  if empty:
    raise ValueError(f"example(s) {empty[:5]} have no references")
  return lists


def bleu(predictions: Sequence[str], references: Sequence[References]) -> float:
  """Corpus BLEU (sacrebleu defaults). sacrebleu takes reference streams (the i-th reference of every example);
  an example with fewer references is padded with None, which sacrebleu skips."""
  import sacrebleu

  lists = _reference_lists(predictions, references)
  streams = [[refs[i] if i < len(refs) else None for refs in lists] for i in range(max(map(len, lists)))]
  return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[References], use_stemmer: bool = True) -> dict[str, float]:
  """Mean ROUGE F-measures ({rouge1, rouge2, rougeL, rougeLsum}), each example against its best reference."""
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
  scores = [scorer.score_multi(refs, p) for p, refs in zip(predictions, _reference_lists(predictions, references))]
  return {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_TYPES}


def _tokens(text: str) -> list[str]:
  """Lower-cased 13a tokens: `evaluate`'s SARI normalisation (from EASSE), so that untokenized sentences (ASSET's)
  split into words and punctuation."""
  from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

  return Tokenizer13a()(text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
  return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _ratio(numerator: float, denominator: float) -> float:
  """0/0 = 1: an edit that no one asked for and the system did not make is not a mistake."""
  return numerator / denominator if denominator else 1.0


def _f1(precision: float, recall: float) -> float:
  return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _sari_order(source: Counter, output: Counter, refs: Counter, num_refs: int) -> tuple[float, float, float]:
  """(keep F1, deletion precision, addition F1) for one n-gram order. `refs` sums the references' counts, so the
  source and output counts are scaled by the number of references to compare with it: keeping (or deleting) an
  n-gram is right in proportion to the references that keep (or drop) it."""
  source_n = Counter({g: c * num_refs for g, c in source.items()})
  output_n = Counter({g: c * num_refs for g, c in output.items()})
  kept, kept_by_refs = source_n & output_n, source_n & refs
  kept_right = kept & refs
  keep = _f1(_ratio(sum(kept_right[g] / kept[g] for g in kept_right), len(kept)),
             _ratio(sum(kept_right.values()), sum(kept_by_refs.values())))
  deleted = source_n - output_n
  deleted_right = deleted - refs
  delete = _ratio(sum(deleted_right[g] / deleted[g] for g in deleted_right), len(deleted))
  added, added_by_refs = set(output) - set(source), set(refs) - set(source)
  add = _f1(_ratio(len(added & added_by_refs), len(added)), _ratio(len(added & added_by_refs), len(added_by_refs)))
  return keep, delete, add


def _sari_sentence(source: str, output: str, references: Sequence[str]) -> float:
  """SARI of one sentence in [0, 1]: the mean over n = 1..4 of keep F1, deletion precision and addition F1,
  averaged."""
  src, out, refs = _tokens(source), _tokens(output), [_tokens(r) for r in references]
  per_order = [_sari_order(_ngrams(src, n), _ngrams(out, n), sum((_ngrams(r, n) for r in refs), Counter()), len(refs))
               for n in range(1, SARI_MAX_ORDER + 1)]
  return float(np.mean(per_order))


def sari(sources: Sequence[str], predictions: Sequence[str], references: Sequence[References]) -> float:
  """Corpus SARI: the mean of the sentences' SARI, times 100."""
  lists = _reference_lists(predictions, references)
  if len(sources) != len(predictions):
    raise ValueError(f"{len(sources)} sources but {len(predictions)} predictions")
  return 100 * float(np.mean([_sari_sentence(s, p, refs) for s, p, refs in zip(sources, predictions, lists)]))


def _target_references(target: str | Sequence[str] | Mapping[str, Any]) -> References:
  return target["references"] if isinstance(target, Mapping) else target


def bleu_metric(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric fn: {"bleu": corpus BLEU}."""
  return {"bleu": bleu(predictions, [_target_references(t) for t in targets])}


def rouge_metric(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric fn: {rouge1, rouge2, rougeL, rougeLsum}, stemmed."""
  return rouge(predictions, [_target_references(t) for t in targets])


def sari_metric(targets: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric fn: {"sari": corpus SARI}, for targets made by `sari_target`."""
  return {"sari": sari([t["source"] for t in targets], predictions, [t["references"] for t in targets])}


def sari_target(output: str, example: Mapping[str, Any] | None = None,
                is_target: bool = False) -> str | dict[str, Any]:
  """postprocess_fn of SARI tasks: a target becomes {"references": the example's references (else the target),
  "source": the example's `source`}; a prediction is stripped of surrounding whitespace."""
  if not is_target:
    return output.strip()
  if not example or example.get("source") is None:
    raise ValueError("SARI scores a rewrite against its source, but the example has no 'source' field: the task "
                     "must provide it and the evaluation must pass it through with the example")
  return {"references": list(example.get("references") or [output]), "source": example["source"]}
