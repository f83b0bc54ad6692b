"""Quality metrics: VQAv2 accuracy, exact match and COCO caption scores.

VQA accuracy follows the official VQAv2 evaluation script (`vqaEval.py`) rule
for rule, so numbers are comparable with published ones:

* the prediction is normalised: newlines/tabs -> spaces, strip,
  `processPunctuation`, then `processDigitArticle` (lower-case, number words
  -> digits, articles dropped, missing apostrophes restored);
* reference answers are taken as given (the annotation files already hold them
  normalised), except that when the annotators disagree they go through
  `processPunctuation` - exactly what the official script does;
* accuracy = mean over the leave-one-out subsets of the references of
  min(#matches in the subset / 3, 1). With the usual 10 answers, 3 or more
  matching annotators give 1.0, 2 give 0.6, 1 gives 0.3.

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

# --- Official VQAv2 answer normalisation tables (copied from vqaEval.py). ---
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


def normalize_answer(answer: str) -> str:
  """Normalises an answer as the official VQAv2 script treats a prediction.

  E.g. "Two" -> "2", "a dog." -> "dog", "dont" -> "don't".
  """
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Official VQAv2 accuracy of one prediction against the human answers.

  Args:
    prediction: the model's answer (raw text; normalised here).
    answers: the reference answers (10 for VQAv2). Any number >= 2 works: the
      score is the mean over the len(answers) leave-one-out subsets.

  Returns:
    accuracy in [0, 1].
  """
  if isinstance(answers, str) or len(answers) < 2:
    raise ValueError(
        f"vqa_accuracy needs >= 2 reference answers (leave-one-out), got "
        f"{answers!r}; use exact_match for single-reference data")
  pred = normalize_answer(prediction)
  refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
  if len(set(refs)) > 1:
    refs = [_process_punctuation(r) for r in refs]
  matches = sum(r == pred for r in refs)
  # Leaving out annotator i removes one match iff annotator i matched.
  per_subset = [min((matches - (r == pred)) / 3.0, 1.0) for r in refs]
  return sum(per_subset) / len(per_subset)


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
) -> tuple[float, list[float]]:
  """VQA accuracy over a corpus: (mean, per-example accuracies)."""
  _check_same_length(predictions, answers_list, "answers_list")
  return _mean_and_per_example(
      [vqa_accuracy(p, a) for p, a in zip(predictions, answers_list)])


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
