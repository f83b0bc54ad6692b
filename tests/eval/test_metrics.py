"""Tests for free_jax.eval.metrics: VQAv2 script rules and caption scores."""

import collections
import random
import re
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


class _VQAEvalScript:
  """Per-question scoring of vqaEval.py, re-derived in the script's own shape.

  official=False: the pre-2021 script (GT-Vision-Lab/VQA a4f1afd), which is
  what LAVIS's lavis/common/vqa_tools/vqa_eval.py is; official=True: today's
  script (a013f00 onwards). Only the tables come from `metrics` (they are
  identical in all three sources); the steps are written out again here, in
  the scripts' order, so that the test does not lean on metrics' helpers.
  """

  def __init__(self, official):
    self.official = official
    self.contractions = dict(metrics._CONTRACTIONS)
    self.manualMap = dict(metrics._NUMBER_WORDS)
    self.articles = ["a", "an", "the"]
    self.periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    self.commaStrip = re.compile(r"(\d)(\,)(\d)")
    self.punct = list(metrics._PUNCT)

  def processPunctuation(self, inText):
    outText = inText
    for p in self.punct:
      if ((p + " " in inText or " " + p in inText)
          or re.search(self.commaStrip, inText) is not None):
        outText = outText.replace(p, "")
      else:
        outText = outText.replace(p, " ")
    # The scripts pass re.UNICODE as the third positional argument: `count`.
    return self.periodStrip.sub("", outText, count=re.UNICODE)

  def processDigitArticle(self, inText):
    outText = []
    for word in inText.lower().split():
      word = self.manualMap.setdefault(word, word)
      if word not in self.articles:
        outText.append(word)
    for wordId, word in enumerate(outText):
      if word in self.contractions:
        outText[wordId] = self.contractions[word]
    return " ".join(outText)

  def score(self, prediction, answers):
    # One question in the annotation-file layout: VQAv2 answer dicts carry
    # distinct answer_ids, so `item != gtAnsDatum` leaves out exactly one.
    quesId = 0
    gts = {quesId: {"answers": [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
        for i, a in enumerate(answers)]}}
    res = {quesId: {"answer": prediction}}
    if self.official:
      for ansDic in gts[quesId]["answers"]:
        ansDic["answer"] = ansDic["answer"].replace("\n", " ")
        ansDic["answer"] = ansDic["answer"].replace("\t", " ")
        ansDic["answer"] = ansDic["answer"].strip()
      resAns = res[quesId]["answer"]
      resAns = resAns.replace("\n", " ")
      resAns = resAns.replace("\t", " ")
      resAns = resAns.strip()
      gtAcc = []
      gtAnswers = [ans["answer"] for ans in gts[quesId]["answers"]]
      if len(set(gtAnswers)) > 1:
        for ansDic in gts[quesId]["answers"]:
          ansDic["answer"] = self.processPunctuation(ansDic["answer"])
          ansDic["answer"] = self.processDigitArticle(ansDic["answer"])
        resAns = self.processPunctuation(resAns)
        resAns = self.processDigitArticle(resAns)
    else:
      resAns = res[quesId]["answer"]
      resAns = resAns.replace("\n", " ")
      resAns = resAns.replace("\t", " ")
      resAns = resAns.strip()
      resAns = self.processPunctuation(resAns)
      resAns = self.processDigitArticle(resAns)
      gtAcc = []
      gtAnswers = [ans["answer"] for ans in gts[quesId]["answers"]]
      if len(set(gtAnswers)) > 1:
        for ansDic in gts[quesId]["answers"]:
          ansDic["answer"] = self.processPunctuation(ansDic["answer"])
    for gtAnsDatum in gts[quesId]["answers"]:
      otherGTAns = [item for item in gts[quesId]["answers"]
                    if item != gtAnsDatum]
      matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
      acc = min(1, float(len(matchingAns)) / 3)
      gtAcc.append(acc)
    return float(sum(gtAcc)) / len(gtAcc)


_SCRIPTS = {"lavis": _VQAEvalScript(official=False),
            "official": _VQAEvalScript(official=True)}

# Answers chosen to hit every branch of the normalisation: punctuation with and
# without neighbouring spaces, digit commas, periods before/after digits,
# number words, articles, contractions, case, stray whitespace, > 32 periods.
_ANSWER_POOL = [
    "dog", "Dog", "dog.", "the dog", "a dog", "The Dog.", "dogs", "dog!",
    " dog", "dog ", "dog\n", "\tdog", "dog" + "." * 40, "hot dog", "hot-dog",
    "2", "two", "Two", "2.", "two dogs", "2 dogs", "none", "None", "0", "zero",
    "ten", "10", "10.", "one", "1", "3,000", "3000", "3, 000", "3,000.",
    "3,000 dogs!", "3.5", "3.50", ".5", "3 .5", "yes", "Yes", "YES", "yes.",
    "yes!", "(yes)", "yes?", "yes ?", "no", "No.", "no!", "dont", "don't",
    "Dont", "do not", "isnt", "isn't", "cant", "Cant", "can't", "oclock",
    "o'clock", "5 oclock", "Im", "im", "black-and-white", "black and white",
    "black - white", "black/white", "black / white", "black & white",
    "t-shirt", "t shirt", "tshirt", "an apple", "apple", "the apple.", "an",
    "a", "the", "", " ", "u.s.", "us", "mr. smith", "mr smith", "left,right",
    "left, right", "left right", "1:00", "1.00", "2 + 2", "2+2", '"hi"', "hi",
    "[red]", "red", "red;blue", "red; blue", "red_blue", "@home", "home",
]


def _perturb(text, rng):
  return rng.choice([
      lambda t: t, lambda t: t, lambda t: t, lambda t: t.upper(),
      lambda t: t.title(), lambda t: t.lower(), lambda t: t + ".",
      lambda t: t + "!", lambda t: " " + t + " ", lambda t: t + "\n",
      lambda t: "the " + t, lambda t: "a " + t, lambda t: t + ",",
  ])(text)


def _random_question(rng):
  """(prediction, answers): unanimous, near-unanimous or mixed annotators."""
  n = 10 if rng.random() < 0.8 else rng.choice([2, 3, 5])
  mode = rng.random()
  if mode < 0.3:  # unanimous
    answers = [_perturb(rng.choice(_ANSWER_POOL), rng)] * n
  elif mode < 0.5:  # all but one agree
    common = rng.choice(_ANSWER_POOL)
    odd = rng.choice([_perturb(common, rng), rng.choice(_ANSWER_POOL)])
    answers = [common] * (n - 1) + [odd]
    rng.shuffle(answers)
  else:  # a few distinct answers, some written differently
    seeds = rng.sample(_ANSWER_POOL, rng.randint(2, 4))
    answers = [_perturb(rng.choice(seeds), rng) if rng.random() < 0.3
               else rng.choice(seeds) for _ in range(n)]
  source = rng.random()
  if source < 0.5:
    prediction = _perturb(rng.choice(answers), rng)
  elif source < 0.7:
    prediction = rng.choice(answers)
  else:
    prediction = _perturb(rng.choice(_ANSWER_POOL), rng)
  return prediction, answers


@pytest.mark.parametrize("rules", metrics.VQA_RULES)
def test_vqa_accuracy_equals_script_on_random_answer_sets(rules):
  rng = random.Random(12)
  seen = collections.Counter()
  for _ in range(4000):
    prediction, answers = _random_question(rng)
    expected = _SCRIPTS[rules].score(prediction, answers)
    got = metrics.vqa_accuracy(prediction, answers, rules=rules)
    assert got == expected, (prediction, answers)
    seen[len(set(answers)) == 1, round(expected, 6)] += 1
  # The sets reach every score of a 10-answer question, unanimous or not.
  for score in (0.0, 0.3, 0.6, 0.9, 1.0):
    assert seen[False, score] > 20, (score, seen)
  assert seen[True, 0.0] > 100 and seen[True, 1.0] > 100, seen


def test_vqa_rule_sets_disagree_on_random_answer_sets():
  rng = random.Random(12)
  questions = [_random_question(rng) for _ in range(4000)]
  differ = sum(
      metrics.vqa_accuracy(p, a) != metrics.vqa_accuracy(p, a, "official")
      for p, a in questions)
  assert 200 < differ < 2000, differ


@pytest.mark.parametrize("prediction, answers, lavis, official", [
    # Unanimous annotators: today's script compares the prediction as typed,
    # the pre-2021 one normalises it first.
    ("Yes", ["yes"] * 10, 1.0, 0.0),
    ("Two", ["2"] * 10, 1.0, 0.0),
    ("dog.", ["dog."] * 10, 0.0, 1.0),
    # Pre-2021 references are not stripped.
    ("dog", ["dog "] * 10, 0.0, 1.0),
    # Disagreeing: pre-2021 references get processPunctuation only, so case,
    # articles and number words in them still count.
    ("dog", ["the dog"] * 3 + ["cat"] * 7, 0.0, 0.9),
    ("dog", ["Dog"] * 2 + ["cat"] * 8, 0.0, 0.6),
    ("2", ["two"] * 4 + ["three"] * 6, 0.0, 1.0),
    ("don't", ["dont"] + ["no"] * 9, 0.0, 0.3),
    # Where they agree.
    ("A dog.", ["dog"] * 3 + ["cat"] * 7, 0.9, 0.9),
    ("3,000", ["3000"] * 10, 1.0, 0.0),
    ("3,000", ["3000"] * 2 + ["3,000"] * 8, 1.0, 1.0),
])
def test_vqa_accuracy_rule_sets_worked_by_hand(prediction, answers, lavis,
                                               official):
  assert metrics.vqa_accuracy(prediction, answers) == pytest.approx(lavis)
  assert metrics.vqa_accuracy(prediction, answers, rules="lavis") == (
      pytest.approx(lavis))
  assert metrics.vqa_accuracy(prediction, answers, rules="official") == (
      pytest.approx(official))
  for rules, expected in (("lavis", lavis), ("official", official)):
    assert _SCRIPTS[rules].score(prediction, answers) == (
        pytest.approx(expected))


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
@pytest.mark.parametrize("rules", metrics.VQA_RULES)
def test_vqa_accuracy_leave_one_out(num_matching, expected, rules):
  answers = ["dog"] * num_matching + ["cat"] * (10 - num_matching)
  assert metrics.vqa_accuracy("dog", answers, rules) == pytest.approx(expected)
  assert round(expected, 6) in (0.0, 0.3, 0.6, 0.9, 1.0)


def test_vqa_accuracy_normalizes_prediction():
  assert metrics.vqa_accuracy("Two", ["2"] * 10) == 1.0
  assert metrics.vqa_accuracy("A dog.", ["dog"] * 3 + ["cat"] * 7) == (
      pytest.approx(0.9))
  assert metrics.vqa_accuracy("dont", ["don't"] * 2 + ["no"] * 8) == (
      pytest.approx(0.6))


def test_vqa_accuracy_reference_punctuation_only_when_annotators_disagree():
  # Both scripts: unanimous references are compared verbatim ...
  assert metrics.vqa_accuracy("dog", ["dog."] * 10) == 0.0
  assert metrics.vqa_accuracy("dog", ["dog."] * 10, "official") == 0.0
  # ... disagreeing ones go through processPunctuation first.
  assert metrics.vqa_accuracy("dog", ["dog."] * 5 + ["cat"] * 5) == 1.0
  assert metrics.vqa_accuracy("dog", ["dog."] * 5 + ["cat"] * 5,
                              "official") == 1.0


@pytest.mark.parametrize("rules", metrics.VQA_RULES)
def test_vqa_accuracy_fewer_answers_uses_available_subsets(rules):
  # 3 answers, all matching: each leave-one-out subset has 2 matches -> 2/3.
  assert metrics.vqa_accuracy("yes", ["yes"] * 3, rules) == (
      pytest.approx(2 / 3))
  # 2 of 4 matching: subsets (1, 1, 2, 2) matches -> (1/3+1/3+2/3+2/3)/4.
  assert metrics.vqa_accuracy("yes", ["yes", "yes", "no", "no"], rules) == (
      pytest.approx(0.5))


@pytest.mark.parametrize("answers", [[], ["yes"], "yes"])
def test_vqa_accuracy_rejects_too_few_answers(answers):
  with pytest.raises(ValueError, match="reference answers"):
    metrics.vqa_accuracy("yes", answers)


@pytest.mark.parametrize("rules", ["LAVIS", "pre2021", None])
def test_vqa_accuracy_rejects_unknown_rules(rules):
  with pytest.raises(ValueError, match="rules"):
    metrics.vqa_accuracy("yes", ["yes"] * 10, rules=rules)
  with pytest.raises(ValueError, match="rules"):
    metrics.vqa_accuracy_batch([], [], rules=rules)


def test_vqa_accuracy_batch_mean_and_per_example():
  mean, per_example = metrics.vqa_accuracy_batch(
      ["dog", "Two", "cat"],
      [["dog"] * 10, ["2"] * 2 + ["3"] * 8, ["dog"] * 10])
  assert per_example == pytest.approx([1.0, 0.6, 0.0])
  assert mean == pytest.approx(1.6 / 3)
  with pytest.raises(ValueError, match="2 predictions but 1 answers_list"):
    metrics.vqa_accuracy_batch(["a", "b"], [["a", "a"]])


def test_vqa_accuracy_batch_threads_rules():
  predictions = ["Yes", "dog"]
  answers = [["yes"] * 10, ["the dog"] * 3 + ["cat"] * 7]
  assert metrics.vqa_accuracy_batch(predictions, answers)[1] == [1.0, 0.0]
  mean, per_example = metrics.vqa_accuracy_batch(predictions, answers,
                                                 rules="official")
  assert per_example == pytest.approx([0.0, 0.9])
  assert mean == pytest.approx(0.45)


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
