"""Tests for free_jax.eval.metrics: official VQAv2 rules and caption scores."""

import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
import pytest

from free_jax.eval import metrics

_HAS_JAVA = shutil.which("java") is not None


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),
    ("a dog.", "dog"),
    ("dont", "don't"),
    ("  The Yes!\n", "yes"),
    ("none", "0"),
    ("1,000", "1000"),            # digit comma: punctuation deleted, no space
    ("black-and-white", "black and white"),
    ("3.5", "3.5"),               # a period between digits is kept
    ("left - right", "left right"),
])
def test_normalize_answer(raw, normalized):
  assert metrics.normalize_answer(raw) == normalized


@pytest.mark.parametrize("num_matching, expected", [
    # Worked by hand over the 10 leave-one-out subsets of 10 answers:
    # k matching -> k subsets with k-1 matches, 10-k subsets with k matches.
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),      # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),      # 0.9
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(num_matching, expected):
  answers = ["dog"] * num_matching + ["cat"] * (10 - num_matching)
  assert metrics.vqa_accuracy("dog", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_prediction():
  assert metrics.vqa_accuracy("Two", ["2"] * 10) == 1.0
  assert metrics.vqa_accuracy("A dog.", ["dog"] * 3 + ["cat"] * 7) == (
      pytest.approx(0.9))
  assert metrics.vqa_accuracy("dont", ["don't"] * 2 + ["no"] * 8) == (
      pytest.approx(0.6))


def test_vqa_accuracy_reference_punctuation_only_when_annotators_disagree():
  # Official quirk: unanimous references are compared verbatim ...
  assert metrics.vqa_accuracy("dog", ["dog."] * 10) == 0.0
  # ... disagreeing ones go through processPunctuation first.
  assert metrics.vqa_accuracy("dog", ["dog."] * 5 + ["cat"] * 5) == 1.0


def test_vqa_accuracy_fewer_answers_uses_available_subsets():
  # 3 answers, all matching: each leave-one-out subset has 2 matches -> 2/3.
  assert metrics.vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)
  # 2 of 4 matching: subsets (1, 1, 2, 2) matches -> (1/3+1/3+2/3+2/3)/4.
  assert metrics.vqa_accuracy("yes", ["yes", "yes", "no", "no"]) == (
      pytest.approx(0.5))


@pytest.mark.parametrize("answers", [[], ["yes"], "yes"])
def test_vqa_accuracy_rejects_too_few_answers(answers):
  with pytest.raises(ValueError, match="reference answers"):
    metrics.vqa_accuracy("yes", answers)


def test_vqa_accuracy_batch_mean_and_per_example():
  mean, per_example = metrics.vqa_accuracy_batch(
      ["dog", "Two", "cat"],
      [["dog"] * 10, ["2"] * 2 + ["3"] * 8, ["dog"] * 10])
  assert per_example == pytest.approx([1.0, 0.6, 0.0])
  assert mean == pytest.approx(1.6 / 3)
  with pytest.raises(ValueError, match="2 predictions but 1 answers_list"):
    metrics.vqa_accuracy_batch(["a", "b"], [["a", "a"]])


def test_exact_match():
  assert metrics.exact_match("Red.", "red") == 1.0
  assert metrics.exact_match("three", "3") == 1.0
  assert metrics.exact_match("blue", "red") == 0.0
  mean, per_example = metrics.exact_match_batch(["cube", "Sphere", "no"],
                                                ["cube", "sphere", "yes"])
  assert per_example == [1.0, 1.0, 0.0]
  assert mean == pytest.approx(2 / 3)


@pytest.mark.parametrize("caption, tokens", [
    ("A man riding a wave on top of a surfboard.",
     "a man riding a wave on top of a surfboard"),
    ("The man isn't smiling; he's \"happy\"?",
     "the man is n't smiling he 's happy"),
    ("A black-and-white photo of 3.5 people (roughly) -- at 1,000 feet",
     "a black-and-white photo of 3.5 people -lrb- roughly -rrb- at 1,000 feet"),
    ("It's 5 o'clock: they can't/won't go... ok",
     "it 's 5 o'clock they ca n't / wo n't go ok"),
    ("A red & blue kite, 50% off #1 $5 e-mail U.S. flag",
     "a red & blue kite 50 % off # 1 $ 5 e-mail u.s. flag"),
    ("Two dogs' toys and a cat's bowl!", "two dogs toys and a cat 's bowl"),
])
def test_ptb_tokenize_python(caption, tokens):
  assert metrics.ptb_tokenize_python(caption) == tokens


@pytest.mark.skipif(not _HAS_JAVA, reason="needs java for Stanford PTB")
def test_python_fallback_matches_java_ptb_tokenizer():
  captions = [
      "A man riding a wave on top of a surfboard.",
      "The man isn't smiling; he's \"happy\"?",
      "A black-and-white photo of 3.5 people (roughly) -- at 1,000 feet",
      "It's 5 o'clock: they can't/won't go... ok",
      "A red & blue kite, 50% off #1 $5 e-mail U.S. flag",
      "Two dogs' toys and a cat's bowl!",
      "  a GIRAFFE standing next to a tree\n in a field ",
  ]
  java = metrics.tokenize_captions({i: [c] for i, c in enumerate(captions)})
  for i, caption in enumerate(captions):
    assert metrics.ptb_tokenize_python(caption) == java[i][0], caption


def test_tokenize_captions_falls_back_without_java(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  # "mr." tells the tokenisers apart: Stanford PTB keeps the period.
  assert metrics.tokenize_captions({7: ["Mr. Smith's dog."]}) == {
      7: ["mr smith 's dog"]}


def test_tokenize_captions_uses_java_when_on_path(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
  if _HAS_JAVA:
    assert metrics.tokenize_captions({7: ["Mr. Smith's dog."]}) == {
        7: ["mr. smith 's dog"]}
  else:  # The Java route is taken, and fails for lack of a real java.
    with pytest.raises(FileNotFoundError):
      metrics.tokenize_captions({7: ["Mr. Smith's dog."]})


_REFS = {
    1: ["A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean."],
    2: ["Two dogs are playing with a frisbee in the park.",
        "A pair of dogs chase a red frisbee on the grass."],
    3: ["A plate of food with broccoli and rice.",
        "A white plate topped with rice, broccoli and meat."],
}


def test_caption_scores_equal_pycocoevalcap_called_directly(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  preds = {1: "A man riding a wave on a surfboard.",
           2: "Two dogs playing in the park.",
           3: "A plate of rice and broccoli."}
  scores = metrics.caption_scores(preds, _REFS)
  gts = {k: [metrics.ptb_tokenize_python(c) for c in v]
         for k, v in _REFS.items()}
  res = {k: [metrics.ptb_tokenize_python(v)] for k, v in preds.items()}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  assert [scores[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu)
  assert scores["CIDEr"] == pytest.approx(cider)
  # Lists are keyed by position and give the same scores.
  as_lists = metrics.caption_scores(list(preds.values()), list(_REFS.values()))
  assert as_lists == pytest.approx(scores)


def test_caption_scores_perfect_beats_wrong(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  perfect = metrics.caption_scores({k: v[0] for k, v in _REFS.items()}, _REFS)
  for n in range(1, 5):
    assert perfect[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
  wrong = metrics.caption_scores(
      {k: "a cat sleeping on a red sofa" for k in _REFS}, _REFS)
  assert wrong["BLEU-4"] < 0.1 < perfect["BLEU-4"]
  assert wrong["CIDEr"] < perfect["CIDEr"]


def test_caption_scores_rejects_mismatched_ids():
  with pytest.raises(ValueError, match=r"missing predictions for \['3'\]"):
    metrics.caption_scores({1: "a", 2: "b"}, _REFS)
  with pytest.raises(ValueError, match=r"references\[1\]"):
    metrics.caption_scores({1: "a"}, {1: []})
