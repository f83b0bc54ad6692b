"""VQAv2 read from the official files on disk, as schema examples.

Expected files (as the official archives unpack; paths are configurable):

  v2_OpenEnded_mscoco_{split}2014_questions.json
      {"questions": [{"image_id", "question", "question_id"}, ...]}
  v2_mscoco_{split}2014_annotations.json          (absent for test splits)
      {"annotations": [{"question_id", "image_id", "answers": [{"answer",
        "answer_confidence", "answer_id"} x 10], "multiple_choice_answer",
        "answer_type", "question_type"}, ...]}
  {split}2014/COCO_{split}2014_{image_id:012d}.jpg

Examples follow `free_jax.data.tfds_pipelines` (see `EXAMPLE_KEYS`): `answer`
is the most common human answer (the annotation's `multiple_choice_answer`),
`answers` the 10 human answers, `id` the question id. Without annotations
(test / test-dev) `answer` is "" and `answers` is [].

A missing file raises an error naming it. An image that cannot be read is
skipped and counted, and one warning gives the count when the pass ends: a
broken file never stops an epoch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
import dataclasses
import functools
import json
import os
from typing import Any, Optional

from absl import logging
import numpy as np
from PIL import Image

from free_jax.data import tfds_pipelines

Example = tfds_pipelines.Example


@dataclasses.dataclass(frozen=True)
class VQAv2Files:
  """Where one VQAv2 split lives on disk.

  Attributes:
    questions: path of the questions JSON.
    images_dir: directory of the COCO images.
    image_pattern: image file name, formatted with `image_id`.
    annotations: path of the annotations JSON; None for splits without
      answers (test, test-dev).
  """
  questions: str
  images_dir: str
  image_pattern: str
  annotations: Optional[str] = None

  @classmethod
  def standard(cls, root: str, split: str) -> VQAv2Files:
    """The official layout under `root`.

    Args:
      root: directory holding the JSONs and the COCO image directories.
      split: "train" or "val" (2014, with answers), "test" or "test-dev"
        (2015, images in test2015/, no answers).
    """
    if split in ("train", "val"):
      return cls(
          questions=os.path.join(
              root, f"v2_OpenEnded_mscoco_{split}2014_questions.json"),
          images_dir=os.path.join(root, f"{split}2014"),
          image_pattern=f"COCO_{split}2014_{{image_id:012d}}.jpg",
          annotations=os.path.join(root,
                                   f"v2_mscoco_{split}2014_annotations.json"))
    if split in ("test", "test-dev"):
      return cls(
          questions=os.path.join(
              root, f"v2_OpenEnded_mscoco_{split}2015_questions.json"),
          images_dir=os.path.join(root, "test2015"),
          image_pattern="COCO_test2015_{image_id:012d}.jpg")
    raise ValueError(f"unknown VQAv2 split {split!r}; expected one of train, "
                     "val, test, test-dev")


def _read_json(path: str, key: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VQAv2 file not found: {path}")
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or key not in data:
    raise ValueError(f"{path}: expected a JSON object with a {key!r} list")
  return data[key]


def read_records(files: VQAv2Files) -> list[dict[str, Any]]:
  """Questions joined with their annotations, in questions-file order.

  Returns:
    one dict per question: question_id, image_id, question, answer, answers,
    question_type (images are not read).
  """
  questions = _read_json(files.questions, "questions")
  annotations = {}
  if files.annotations is not None:
    annotations = {a["question_id"]: a
                   for a in _read_json(files.annotations, "annotations")}
  if not os.path.isdir(files.images_dir):
    raise FileNotFoundError(f"VQAv2 image directory not found: "
                            f"{files.images_dir}")
  records = []
  for q in questions:
    record = {"question_id": q["question_id"], "image_id": q["image_id"],
              "question": q["question"], "answer": "", "answers": [],
              "question_type": ""}
    if files.annotations is not None:
      ann = annotations.get(q["question_id"])
      if ann is None:
        raise ValueError(f"{files.annotations}: no annotation for question_id "
                         f"{q['question_id']}")
      answers = [a["answer"] for a in ann["answers"]]
      record.update(
          answers=answers, question_type=ann.get("question_type", ""),
          answer=(ann.get("multiple_choice_answer")
                  or collections.Counter(answers).most_common(1)[0][0]))
    records.append(record)
  return records


def _read_image(path: str, image_size: Optional[int]) -> Optional[np.ndarray]:
  """uint8[S, S, 3] (`tfds_pipelines.resize_image`), None if unreadable."""
  try:
    with Image.open(path) as im:
      image = tfds_pipelines.resize_image(np.asarray(im.convert("RGB")),
                                          image_size)
  except (OSError, ValueError, SyntaxError):  # What PIL raises on bad files.
    return None
  image.flags.writeable = False  # Shared between questions via the cache.
  return image


def load_vqav2(files: VQAv2Files, *,
               image_size: Optional[int] = 224,
               max_examples: Optional[int] = None,
               offset: int = 0,
               shuffle_seed: Optional[int] = None,
               batch_size: Optional[int] = None,
               drop_remainder: bool = False) -> Iterator[Example]:
  """VQAv2 examples (one per question) from the official files.

  Args:
    files: where the split lives, e.g. `VQAv2Files.standard(root, "val")`.
    image_size: resize images to S x S; None keeps the original size.
    max_examples: keep the first N questions (file order) before shuffling.
    offset: skip the first `offset` questions (file order) before that, e.g.
      to take a calibration subset disjoint from a test subset of one split.
    shuffle_seed: None keeps file order; an int permutes deterministically.
    batch_size: None yields examples; an int yields batches
      (`tfds_pipelines.batch_examples`).
    drop_remainder: drop the last partial batch.

  Returns:
    iterator of schema examples or batches. Files are checked here, eagerly;
    images are read lazily, unreadable ones skipped (counted in one warning).
  """
  records = read_records(files)[offset:][:max_examples]
  if shuffle_seed is not None:
    order = np.random.default_rng(shuffle_seed).permutation(len(records))
    records = [records[i] for i in order]
  examples = _examples(records, files, image_size)
  if batch_size is None:
    return examples
  return tfds_pipelines.batch_examples(examples, batch_size, drop_remainder)


def _examples(records: list[dict[str, Any]], files: VQAv2Files,
              image_size: Optional[int]) -> Iterator[Example]:
  # Questions of one image are adjacent in the official files: a small cache
  # decodes each image once per pass in file order.
  read = functools.lru_cache(maxsize=16)(
      functools.partial(_read_image, image_size=image_size))
  skipped = []
  try:
    for r in records:
      path = os.path.join(files.images_dir,
                          files.image_pattern.format(image_id=r["image_id"]))
      image = read(path)
      if image is None:
        skipped.append(path)
        continue
      yield tfds_pipelines.make_example(
          image, r["question_id"], question=r["question"], answer=r["answer"],
          answers=r["answers"], question_type=r["question_type"])
  finally:
    if skipped:
      logging.warning("VQAv2: skipped %d questions whose image could not be "
                      "read (%d files, e.g. %s)", len(skipped),
                      len(set(skipped)), skipped[0])
