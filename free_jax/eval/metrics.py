"""Quality metrics: VQAv2 accuracy, exact match and COCO caption scores.

`vqa_accuracy` reproduces, per question, one of two versions of the VQAv2
evaluation script `vqaEval.py` (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py):

* `rules='lavis'` (the default): the script before commit a013f00 (March 2021),
  i.e. a4f1afd, which LAVIS copies as lavis/common/vqa_tools/vqa_eval.py and
  with which the published BLIP-2 VQAv2 numbers were computed.
  The prediction always gets newlines/tabs -> spaces, strip,
  `processPunctuation`, `processDigitArticle` (lower-case, number words ->
  digits, articles dropped, missing apostrophes restored). The reference
  answers are used verbatim (not even stripped), except that when they are
  not all identical each goes through `processPunctuation` (only).
* `rules='official'`: today's script (a013f00 onwards). Prediction and
  references always get newlines/tabs -> spaces and strip; only when the
  (stripped) references are not all identical do both the prediction and each
  reference go through `processPunctuation` and `processDigitArticle`. With
  unanimous annotators the prediction is compared as typed: "Yes" scores 0
  against ten "yes" (it scores 1 under 'lavis').

Both then score the same way: for each of the n leave-one-out subsets of the
n references, min(#references in the subset equal to the prediction / 3, 1),
averaged over the n subsets (a subset drops one answer record; VQAv2's have
distinct answer_ids, so equal strings are not dropped together). With the
usual 10 answers, k matching annotators give
(k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10: 0 -> 0.0, 1 -> 0.3,
2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

Caption scores are pycocoevalcap's `Bleu(4)` and `Cider` on text tokenised by
pycocoevalcap's Stanford `PTBTokenizer` when `java` is on PATH; otherwise by
`ptb_tokenize_python`, a documented pure-Python approximation of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
import shutil
from typing import Hashable, Union

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer import ptbtokenizer

# --- VQAv2 answer normalisation tables (copied from vqaEval.py; identical in
# the pre-2021 and today's versions and in LAVIS's copy). ---
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
          "-", ">", "<", "@", "`", ",", "?", "!")
# The official regex (its `(?!<=\d)` is a typo for a lookbehind; kept as is).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
  """`processPunctuation` of vqaEval.py."""
  out = text
  has_digit_comma = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT:
    if p + " " in text or " " + p in text or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The official call passes re.UNICODE (== 32) positionally, i.e. as `count`.
  return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
  """`processDigitArticle` of vqaEval.py."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
  """vqaEval.py's first step: newlines and tabs -> spaces, then strip."""
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
  """Normalises an answer as vqaEval.py (pre-2021, LAVIS) does a prediction.

  Whitespace clean-up, `processPunctuation`, `processDigitArticle`.
  E.g. "Two" -> "2", "a dog." -> "dog", "dont" -> "don't".
  """
  return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


VQA_RULES = ("lavis", "official")


def _check_rules(rules: str) -> None:
  if rules not in VQA_RULES:
    raise ValueError(f"rules must be one of {VQA_RULES}, got {rules!r}")


def vqa_accuracy(prediction: str, answers: Sequence[str],
                 rules: str = "lavis") -> float:
  """VQAv2 accuracy of one prediction, as vqaEval.py scores one question.

  Args:
    prediction: the model's answer (raw text; normalised here as `rules` say).
    answers: the reference answers (10 for VQAv2), as in the annotation file.
      Any number >= 2 works: the score is the mean over the len(answers)
      leave-one-out subsets.
    rules: 'lavis' (default) - the pre-2021 vqaEval.py that LAVIS ships and
      BLIP-2's published numbers use: the prediction is always normalised, the
      references are verbatim or, when not unanimous, `processPunctuation`-ed.
      'official' - today's vqaEval.py: prediction and references are
      whitespace-cleaned, and fully normalised (punctuation, then digits/
      articles/contractions) only when the references are not unanimous.
      See the module docstring.

  Returns:
    accuracy in [0, 1]: mean over the leave-one-out subsets of
    min(#matches / 3, 1). Of 10 answers, 1/2/3/4+ matching give
    0.3/0.6/0.9/1.0.
  """
  _check_rules(rules)
  if isinstance(answers, str) or len(answers) < 2:
    raise ValueError(
        f"vqa_accuracy needs >= 2 reference answers (leave-one-out), got "
        f"{answers!r}; use exact_match for single-reference data")
  if rules == "lavis":
    pred = normalize_answer(prediction)
    refs = list(answers)
    if len(set(refs)) > 1:
      refs = [_process_punctuation(r) for r in refs]
  else:
    pred = _clean_whitespace(prediction)
    refs = [_clean_whitespace(a) for a in answers]
    if len(set(refs)) > 1:
      refs = [_process_digit_article(_process_punctuation(r)) for r in refs]
      pred = _process_digit_article(_process_punctuation(pred))
  matches = sum(r == pred for r in refs)
  # Leaving out annotator i removes one match iff annotator i matched.
  per_subset = [min(1, (matches - (r == pred)) / 3) for r in refs]
  return float(sum(per_subset) / len(per_subset))


def exact_match(prediction: str, answer: str) -> float:
  """1.0 when the normalised prediction equals the normalised answer, else 0."""
  return float(normalize_answer(prediction) == normalize_answer(answer))


def _check_same_length(predictions, references, name: str) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} "
                     f"{name}")


def _mean_and_per_example(
    scores: list[float]) -> tuple[float, list[float]]:
  if not scores:
    raise ValueError("no predictions to score")
  return sum(scores) / len(scores), scores


def vqa_accuracy_batch(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    rules: str = "lavis",
) -> tuple[float, list[float]]:
  """VQA accuracy over a corpus: (mean, per-example accuracies).

  `rules` as in `vqa_accuracy`. The mean is that of the per-question scores,
  i.e. vqaEval.py's 'overall' before its rounding to a percentage.
  """
  _check_rules(rules)
  _check_same_length(predictions, answers_list, "answers_list")
  return _mean_and_per_example(
      [vqa_accuracy(p, a, rules) for p, a in zip(predictions, answers_list)])


def exact_match_batch(
    predictions: Sequence[str],
    answers: Sequence[str],
) -> tuple[float, list[float]]:
  """Exact match over a corpus: (mean, per-example 0/1 scores)."""
  _check_same_length(predictions, answers, "answers")
  return _mean_and_per_example(
      [exact_match(p, a) for p, a in zip(predictions, answers)])


# --- Caption scores. ---
# Stanford PTBTokenizer (with -lowerCase) turns brackets into these tokens;
# they are not in pycocoevalcap's PUNCTUATIONS, so they survive in the scores.
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
                 "{": "-lcb-", "}": "-rcb-"}
_PTB_QUOTES = frozenset({'"', "``", "''"})
_CLITIC_NT = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('s|'re|'ve|'d|'ll|'m)\b")
_PTB_TOKEN = re.compile(
    r"\d+(?:[.,]\d+)+"          # numbers: 3.5, 1,000
    r"|(?:[^\W\d_]\.){2,}"      # dotted abbreviations: u.s.
    r"|n't|'(?:s|re|ve|d|ll|m)\b"  # clitics split off above
    r"|\w+(?:[-']\w+)*"         # words, hyphenated words, o'clock
    r"|--|\.\.\.|\S")           # multi-character punctuation, any other symbol


def ptb_tokenize_python(text: str) -> str:
  """Pure-Python stand-in for pycocoevalcap's PTBTokenizer on one caption.

  Mimics `PTBTokenizer -preserveLines -lowerCase` followed by removal of
  pycocoevalcap's `PUNCTUATIONS`: lower-cases; splits clitics as PTB does
  ("isn't" -> "is n't", "can't" -> "ca n't", "cat's" -> "cat 's"); keeps
  numbers ("3.5", "1,000"), dotted abbreviations ("u.s.") and hyphenated words
  whole; splits every other symbol into its own token ("50%" -> "50 %");
  brackets become "-lrb-" etc. like PTB; then drops quotes and PUNCTUATIONS.
  Known differences: PTB keeps a final period on abbreviations it knows
  ("mr.", "ft.") and splits "cannot"/"gonna"; this function does not.

  Returns:
    space-joined tokens.
  """
  text = text.replace("\n", " ").lower()
  text = _CLITIC_NT.sub(r"\1 \2", text)
  text = _CLITIC.sub(r"\1 \2", text)
  tokens = (_PTB_BRACKETS.get(t, t) for t in _PTB_TOKEN.findall(text))
  drop = _PTB_QUOTES.union(ptbtokenizer.PUNCTUATIONS)
  return " ".join(t for t in tokens if t not in drop)


def tokenize_captions(
    captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
  """PTB-tokenises {id: [caption, ...]}: Java PTBTokenizer if available."""
  if shutil.which("java") is not None:
    return ptbtokenizer.PTBTokenizer().tokenize(
        {k: [{"caption": c} for c in v] for k, v in captions.items()})
  return {k: [ptb_tokenize_python(c) for c in v] for k, v in captions.items()}


Captions = Union[Mapping[Hashable, str], Sequence[str]]
References = Union[Mapping[Hashable, Sequence[str]], Sequence[Sequence[str]]]


def _as_dict(x, name: str) -> dict:
  if isinstance(x, Mapping):
    return dict(x)
  if isinstance(x, str):
    raise TypeError(f"{name} must be a dict or a list, got a str")
  return dict(enumerate(x))


def caption_scores(predictions: Captions,
                   references: References) -> dict[str, float]:
  """Corpus BLEU-1..4 and CIDEr (pycocoevalcap) of generated captions.

  Args:
    predictions: {id: caption} or a list of captions (ids = list positions).
    references: {id: [reference captions]} or a list of lists, with the same
      ids as `predictions`.

  Returns:
    {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"} -> float. CIDEr's IDF is
    computed from the references of this corpus, so score a whole split, not
    one image.
  """
  preds = _as_dict(predictions, "predictions")
  refs = _as_dict(references, "references")
  if preds.keys() != refs.keys():
    missing = sorted(map(str, refs.keys() - preds.keys()))[:5]
    extra = sorted(map(str, preds.keys() - refs.keys()))[:5]
    raise ValueError(f"prediction/reference ids differ: missing predictions "
                     f"for {missing}, no references for {extra}")
  if not preds:
    raise ValueError("no predictions to score")
  for k, v in refs.items():
    if isinstance(v, str) or not v:
      raise ValueError(f"references[{k!r}] must be a non-empty list of str")
  # Tokenise both sides in one call: one JVM start instead of two.
  tokenized = tokenize_captions(
      {**{("ref", k): list(v) for k, v in refs.items()},
       **{("pred", k): [v] for k, v in preds.items()}})
  gts = {k: tokenized["ref", k] for k in refs}
  res = {k: tokenized["pred", k] for k in refs}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
  scores["CIDEr"] = float(cider)
  return scores
