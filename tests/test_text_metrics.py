"""BLEU, ROUGE and SARI against values worked out by hand and values their authors published."""

import math

import pytest

from moe_jax.evaluation import text_metrics as tm

# The example in sacrebleu's README, references grouped per prediction.
SACREBLEU_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACREBLEU_REFS = [["The dog bit the man.", "The dog had bit the man."],
                  ["It was not unexpected.", "No one was surprised."],
                  ["The man bit him first.", "The man had bitten the dog."]]
# The test cases of the SARI paper (Xu et al. 2016), as tensor2tensor's and `evaluate`'s tests use them.
SARI_SOURCE = "About 95 species are currently accepted ."
SARI_REFS = ["About 95 species are currently known .", "About 95 species are now accepted .",
             "95 species are now accepted ."]


def test_bleu_hand_worked():
  """Prediction "the cat sat on the mat", reference "the cat sat on a mat": clipped n-gram matches 5/6 (the once),
  3/5, 2/4, 1/3; equal lengths, so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4)."""
  assert tm.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
  assert tm.bleu(["the cat sat on a mat"], [["the cat sat on a mat"]]) == pytest.approx(100.0)


def test_bleu_is_one_corpus_score_with_brevity_penalty():
  """Corpus BLEU sums n-gram counts over examples. Adding "the cat sat on the" (reference "the cat sat on the
  mat": 5/5, 4/4, 3/3, 2/2 matches) to the example above gives 10/11, 7/9, 5/7, 3/5 and 11 predicted against 12
  reference words: brevity penalty exp(1 - 12/11). Alone, that short prediction scores exp(1 - 6/5)."""
  assert tm.bleu(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.2))
  expected = 100 * math.exp(1 - 12 / 11) * (10 / 11 * 7 / 9 * 5 / 7 * 3 / 5) ** 0.25
  assert tm.bleu(["the cat sat on the mat", "the cat sat on the"],
                 ["the cat sat on a mat", "the cat sat on the mat"]) == pytest.approx(expected)


def test_bleu_published_examples():
  """sacrebleu's README: 48.53 with two references each; 29.44 when the first prediction has only its second."""
  assert tm.bleu(SACREBLEU_SYS, SACREBLEU_REFS) == pytest.approx(48.53, abs=0.005)
  fewer = [SACREBLEU_REFS[0][1:]] + SACREBLEU_REFS[1:]
  assert tm.bleu(SACREBLEU_SYS, fewer) == pytest.approx(29.44, abs=0.005)


def test_rouge_hand_worked_stemmed_best_reference_mean():
  """Example 1: "the cat sat" against "the cats sat" (stemmed: cats -> cat, so 100 on every type; the other
  reference is worse and ignored). Example 2: "the dog sat" against "the dog ran home": unigrams the, dog shared,
  P = 2/3, R = 2/4, F = 4/7; bigram "the dog" shared, P = 1/2, R = 1/3, F = 2/5; LCS "the dog" as unigrams.
  The scores are the means of the two examples."""
  scores = tm.rouge(["the cat sat", "the dog sat"],
                    [["something else entirely", "the cats sat"], "the dog ran home"])
  assert scores == pytest.approx({"rouge1": 100 * (1 + 4 / 7) / 2, "rouge2": 100 * (1 + 2 / 5) / 2,
                                  "rougeL": 100 * (1 + 4 / 7) / 2, "rougeLsum": 100 * (1 + 4 / 7) / 2})
  unstemmed = tm.rouge(["the cat sat"], ["the cats sat"], use_stemmer=False)
  assert unstemmed == pytest.approx({"rouge1": 200 / 3, "rouge2": 0.0, "rougeL": 200 / 3, "rougeLsum": 200 / 3})


def test_rouge_lsum_reads_lines_as_sentences():
  """Two sentences in swapped order: ROUGE-L over the whole text finds a common subsequence of 3 of 6 words; ROUGE-
  Lsum matches each reference line against the prediction's lines and finds all of them."""
  scores = tm.rouge(["the dog ran\nthe cat sat"], ["the cat sat\nthe dog ran"])
  assert scores["rougeL"] == pytest.approx(50.0) and scores["rougeLsum"] == pytest.approx(100.0)


def test_sari_published_values():
  """The SARI paper's three outputs: tensor2tensor's test values (0.2695360, 0.6170966, 0.5088682, which
  `evaluate`'s metric card repeats for the first as 26.953601953601954), and 100 for output = reference = source."""
  for output, expected in (("About 95 you now get in .", 26.953601953601954),
                           ("About 95 species are now agreed .", 61.70966),
                           ("About 95 species are currently agreed .", 50.88682)):
    assert tm.sari([SARI_SOURCE], [output], [SARI_REFS]) == pytest.approx(expected, abs=1e-5), output
  assert tm.sari([SARI_SOURCE], [SARI_SOURCE], [[SARI_SOURCE]]) == pytest.approx(100.0)
  untokenized = tm.sari(["About 95 species are currently accepted."], ["About 95 you now get in."],
                        [[r.replace(" .", ".") for r in SARI_REFS]])
  assert untokenized == pytest.approx(26.953601953601954)  # 13a tokenization splits the full stop off


def test_sari_hand_worked():
  """Source "a b c", output "a d", reference "a c" (0/0 counts as 1):
    unigrams: keep a: P = 1, R = 1/2 (c also kept by the reference), F1 = 2/3; deleted b right, c wrong: P = 1/2;
              added d not in the reference: P = 0, nothing to add: R = 1, F1 = 0
    bigrams:  nothing kept (F1 = 1); ab, bc deleted, both right (P = 1); added ad, reference adds ac: F1 = 0
    3-grams:  abc deleted, right; 4-grams: none: 1, 1, 1 for both
  keep (2/3 + 3) / 4 = 11/12, deletion (1/2 + 3) / 4 = 7/8, addition 2/4: SARI = (11/12 + 7/8 + 1/2) / 3 = 55/72.
  With two references, "a" and "a b", for source "a b" and output "a": the counts are scaled by 2, so deleting b is
  half right (one reference keeps it): unigrams keep a: P = 1, R = 2/3, F1 = 4/5; deletion 1/2; nothing added: 1.
  Bigram ab deleted: keep P = 1, R = 0, F1 = 0; deletion 1/2; addition 1. Keep (4/5 + 0 + 2) / 4 = 7/10, deletion
  (1/2 + 1/2 + 2) / 4 = 3/4, addition 1: SARI = (7/10 + 3/4 + 1) / 3 = 49/60. The corpus score is the mean."""
  assert tm.sari(["a b c"], ["a d"], [["a c"]]) == pytest.approx(100 * 55 / 72)
  assert tm.sari(["a b"], ["a"], [["a", "a b"]]) == pytest.approx(100 * 49 / 60)
  assert tm.sari(["a b c", "a b"], ["a d", "a"], [["a c"], ["a", "a b"]]) == pytest.approx(50 * (55 / 72 + 49 / 60))


def test_seqio_metric_fns_and_sari_target():
  """The metric fns read what postprocess_fns make of targets: strings, reference lists, `sari_target`'s dicts."""
  example = {"references": SARI_REFS, "source": SARI_SOURCE}
  target = tm.sari_target("ignored", example=example, is_target=True)
  assert target == {"references": SARI_REFS, "source": SARI_SOURCE}
  assert tm.sari_target(" About 95 you now get in . ") == "About 95 you now get in ."
  assert tm.sari_metric([target], ["About 95 you now get in ."]) == {"sari": pytest.approx(26.953601953601954)}
  assert tm.bleu_metric([target], [SARI_REFS[1]]) == {"bleu": pytest.approx(100.0)}
  for targets in (SACREBLEU_REFS, [{"references": r} for r in SACREBLEU_REFS]):
    assert tm.bleu_metric(targets, SACREBLEU_SYS)["bleu"] == pytest.approx(48.53, abs=0.005)
  assert tm.rouge_metric(["the cats sat"], ["the cat sat"])["rouge1"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="no 'source' field"):
    tm.sari_target("x", example={"references": ["x"]}, is_target=True)


def test_mismatched_or_empty_inputs_fail_clearly():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    tm.bleu(["a", "b"], ["a"])
  with pytest.raises(ValueError, match=r"example\(s\) \[1\] have no references"):
    tm.rouge(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="1 sources but 2 predictions"):
    tm.sari(["a"], ["a", "b"], ["a", "b"])
  with pytest.raises(ValueError, match="no predictions"):
    tm.bleu([], [])
