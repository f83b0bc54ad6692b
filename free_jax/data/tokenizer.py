"""Tokenizers: the embedded word-level vocabulary, and real BLIP-2 tokenizers from a local directory.

The embedded tokenizer is a `tokenizers` WordLevel model wrapped in transformers'
`PreTrainedTokenizerFast`, so code paths are the same as with real OPT / Flan-T5 tokenizers
(batch encode/decode, special tokens, `save_pretrained` / `AutoTokenizer.from_pretrained`). Its
vocabulary is every word the Sort-of-CLEVR generator and the prompt templates can produce, sorted,
after the special tokens — so it is identical on every machine. Like the real tokenizer of each LM
family, it adds special tokens on `tokenizer(text)`: OPT prepends BOS, Flan-T5 appends EOS.
"""

from __future__ import annotations

import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from free_jax.data import batching, sort_of_clevr

PAD, BOS, EOS, UNK, IMAGE = '<pad>', '<s>', '</s>', '<unk>', batching.IMAGE_TOKEN
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4, in this order.


def embedded_vocabulary() -> list[str]:
  """Special tokens, then the sorted words of all generator texts and prompt templates."""
  split = pre_tokenizers.Whitespace()
  texts = sort_of_clevr.vocabulary() + [t.format(question='') for t in batching.PROMPTS.values()]
  words = {w for text in texts for w, _ in split.pre_tokenize_str(text)}
  return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


def embedded_tokenizer(family: str = 'opt') -> PreTrainedTokenizerFast:
  """The embedded tokenizer, adding special tokens the way `family`'s real tokenizer does."""
  if family not in batching.FAMILIES:
    raise ValueError(f'family={family!r}; expected one of {batching.FAMILIES}')
  vocab = {w: i for i, w in enumerate(embedded_vocabulary())}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  single = f'{BOS} $A' if family == 'opt' else f'$A {EOS}'
  special = BOS if family == 'opt' else EOS
  tok.post_processor = processors.TemplateProcessing(single=single,
                                                     special_tokens=[(special, vocab[special])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                 unk_token=UNK, extra_special_tokens=[IMAGE])


def load_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerBase:
  """A saved tokenizer (real BLIP-2 checkpoint or a saved embedded one) from a local directory."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'tokenizer directory not found: {str(path)!r}')
  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot load a tokenizer from {str(path)!r}: {e}') from e


def decode(tokenizer: PreTrainedTokenizerBase, ids) -> list[str]:
  """Texts of int[B, T] generated ids: each row up to its first EOS, special tokens dropped."""
  rows = []
  for row in ids:
    row = [int(t) for t in row]
    if tokenizer.eos_token_id in row:
      row = row[:row.index(tokenizer.eos_token_id)]
    rows.append(row)
  return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
