"""Real-dataset pipelines from prepared tfds data: CLEVR (VQA), COCO captions.

Every data source in free_jax (the embedded generator, these tfds datasets,
VQAv2 from disk) yields the same **example schema**, so training and
evaluation code is source-agnostic. One example is a dict with all of
`EXAMPLE_KEYS`:

  image          uint8[H, W, 3]   H = W = image_size when resized (PIL
                                  bicubic, `resize_image`)
  question       str              "" for captioning data
  answer         str              the VQA training target (VQAv2: the most
                                  common human answer); "" for captions
  answers        list[str]        all reference answers (VQAv2: 10; CLEVR:
                                  [answer]; [] when unknown, e.g. test splits)
  question_type  str              VQAv2: its `question_type`; CLEVR: what the
                                  answer is ("yes/no", "count", "query_color",
                                  "query_shape", "query_material",
                                  "query_size", "other"); captions: "caption"
  caption        str              the captioning training target; "" for VQA
  captions       list[str]        all reference captions; [] for VQA
  id             int | str        unique per example (captions: the image id)

A batch (`batch_examples`) has the same keys: `image` stacked to
uint8[B, H, W, 3] and every other key a list of length B.

Datasets are read with `tfds.load(..., download=False)` from `data_dir`:
nothing is ever downloaded; prepare them elsewhere with `tfds build clevr
--data_dir=DIR` / `tfds build coco_captions --data_dir=DIR`. Feature specs
used (tensorflow_datasets 4.9.10): `clevr` 3.1.0 has `image`, `file_name`,
`objects` and a `question_answer` Sequence of {question, answer} (several per
image, flattened here to one example each; no question family); `coco_captions`
(2014) has `image`, `image/id`, `image/filename`, `objects` and a `captions`
Sequence of {text, id}.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import functools
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
# Lazy: TensorFlow (seconds to import) loads only when a pipeline is built.
from tensorflow_datasets.core.utils.lazy_imports_utils import tensorflow as tf

EXAMPLE_KEYS = ("image", "question", "answer", "answers", "question_type",
                "caption", "captions", "id")

Example = dict[str, Any]


def make_example(image: np.ndarray, example_id: int | str, *,
                 question: str = "", answer: str = "",
                 answers: Sequence[str] = (), question_type: str = "",
                 caption: str = "", captions: Sequence[str] = ()) -> Example:
  """Builds one schema example; fields a task does not use stay empty."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"example {example_id!r}: image must be uint8[H, W, 3], "
                     f"got {image.dtype}{list(image.shape)}")
  return dict(image=image, question=question, answer=answer,
              answers=list(answers), question_type=question_type,
              caption=caption, captions=list(captions), id=example_id)


def batch_examples(examples: Iterable[Example], batch_size: int,
                   drop_remainder: bool = False) -> Iterator[Example]:
  """Groups schema examples into batches (images stacked, the rest listed)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  buffer = []
  for example in examples:
    buffer.append(example)
    if len(buffer) == batch_size:
      yield _collate(buffer)
      buffer = []
  if buffer and not drop_remainder:
    yield _collate(buffer)


def _collate(examples: list[Example]) -> Example:
  shapes = {ex["image"].shape for ex in examples}
  if len(shapes) > 1:
    raise ValueError(f"cannot batch images of different shapes {sorted(shapes)}"
                     "; set image_size")
  batch = {k: [ex[k] for ex in examples] for k in EXAMPLE_KEYS}
  batch["image"] = np.stack(batch["image"])
  return batch


def _load(name: str, split: str, data_dir: str):
  """`tfds.load` without download; returns (tf.data.Dataset, DatasetInfo)."""
  try:
    # Keep TF off accelerators: JAX owns them. Only possible before TF has
    # initialised its devices, which an earlier pipeline may already have done.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  try:
    return tfds.load(name, split=split, data_dir=data_dir, download=False,
                     shuffle_files=False, with_info=True)
  except AssertionError as e:  # How tfds reports missing prepared data.
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared in "
        f"data_dir={data_dir!r}; free_jax never downloads - run `tfds build "
        f"{name} --data_dir={data_dir}` on a machine with internet") from e


def resize_image(image: np.ndarray, image_size: Optional[int]) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[S, S, 3] by PIL bicubic; None: unchanged.

  The resampling of transformers' BlipImageProcessor, so that
  `preprocess.preprocess_images` (which resizes S x S to S x S, a no-op) gives
  exactly what HF would give on the original image.
  """
  if image_size is None:
    return image
  resized = Image.fromarray(image).resize((image_size, image_size),
                                          Image.Resampling.BICUBIC)
  return np.asarray(resized)


def _resize(image, image_size: Optional[int]):
  """`resize_image` inside a tf.data graph."""
  if image_size is None:
    return image
  image = tf.numpy_function(functools.partial(resize_image,
                                              image_size=image_size),
                            [image], tf.uint8, stateful=False)
  return tf.ensure_shape(image, (image_size, image_size, 3))


def _finish(ds, to_example, *, max_examples: Optional[int],
            shuffle_seed: Optional[int], shuffle_buffer: int,
            batch_size: Optional[int],
            drop_remainder: bool) -> Iterator[Example]:
  """Takes, shuffles, converts to schema examples, batches."""
  if max_examples is not None:
    ds = ds.take(max_examples)  # A fixed subset, whatever the shuffle seed.
  if shuffle_seed is not None:
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed,
                    reshuffle_each_iteration=False)
  examples = (to_example(ex) for ex in tfds.as_numpy(
      ds.prefetch(tf.data.AUTOTUNE)))
  if batch_size is None:
    return examples
  return batch_examples(examples, batch_size, drop_remainder)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_clevr_vqa(split: str, data_dir: str, *,
                   max_examples: Optional[int] = None,
                   image_size: Optional[int] = 224,
                   shuffle_seed: Optional[int] = None,
                   shuffle_buffer: int = 10_000,
                   batch_size: Optional[int] = None,
                   drop_remainder: bool = False) -> Iterator[Example]:
  """CLEVR question answering, one example per (image, question).

  Args:
    split: tfds split, e.g. "train", "validation", "test[:1000]".
    data_dir: directory holding the prepared `clevr` tfds data.
    max_examples: keep the first N questions (in file order) before shuffling.
    image_size: resize images to S x S (bicubic); None keeps the original size.
    shuffle_seed: None keeps file order; an int shuffles deterministically
      (pass e.g. seed + epoch for a new order per epoch).
    shuffle_buffer: tf.data shuffle buffer, in questions.
    batch_size: None yields examples; an int yields `batch_examples` batches.
    drop_remainder: drop the last partial batch.

  Returns:
    iterator of schema examples (see module docstring) or batches of them.
  """
  ds, info = _load("clevr", split, data_dir)
  # Answer vocabulary -> question type, from the dataset's own class names.
  objects = info.features["objects"]
  answer_type = {"yes": "yes/no", "no": "yes/no"}
  for attr in ("color", "shape", "material", "size"):
    answer_type.update({n: f"query_{attr}" for n in objects[attr].names})

  def resize(ex):
    return dict(ex, image=_resize(ex["image"], image_size))

  def flatten(ex):
    qa = ex["question_answer"]
    # Real records pair questions and answers 1:1, but tfds.testing.mock_data
    # draws each sub-feature's length independently: pair the common prefix.
    n = tf.minimum(tf.shape(qa["question"])[0], tf.shape(qa["answer"])[0])
    per_question = tf.data.Dataset.from_tensor_slices(
        {"question": qa["question"][:n], "answer": qa["answer"][:n],
         "index": tf.range(n)})
    return per_question.map(lambda q: dict(q, image=ex["image"],
                                           file_name=ex["file_name"]))

  def to_example(ex) -> Example:
    answer = _text(ex["answer"])
    if answer.isdigit():
      question_type = "count"
    else:
      question_type = answer_type.get(answer, "other")
    return make_example(
        ex["image"], f"{_text(ex['file_name'])}#{ex['index']}",
        question=_text(ex["question"]), answer=answer,
        answers=[answer] if answer else [], question_type=question_type)

  ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE).flat_map(flatten)
  return _finish(ds, to_example, max_examples=max_examples,
                 shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                 batch_size=batch_size, drop_remainder=drop_remainder)


def load_coco_captions(split: str, data_dir: str, *,
                       per_caption: bool = False,
                       max_examples: Optional[int] = None,
                       image_size: Optional[int] = 224,
                       shuffle_seed: Optional[int] = None,
                       shuffle_buffer: int = 10_000,
                       batch_size: Optional[int] = None,
                       drop_remainder: bool = False) -> Iterator[Example]:
  """COCO captions (Karpathy splits: train, val, test, restval).

  Args:
    split: tfds split, e.g. "train", "val", "test".
    data_dir: directory holding the prepared `coco_captions` tfds data.
    per_caption: False: one example per image, `caption` = its first
      reference (evaluation); True: one example per (image, caption), each
      caption in turn the target (training).
    max_examples, image_size, shuffle_seed, shuffle_buffer, batch_size,
    drop_remainder: as for `load_clevr_vqa` (counted in examples).

  Returns:
    iterator of schema examples (see module docstring) or batches of them.
  """
  ds, _ = _load("coco_captions", split, data_dir)

  def select(ex):
    return {"image": _resize(ex["image"], image_size),
            "image_id": ex["image/id"], "captions": ex["captions"]["text"]}

  def flatten(ex):
    return tf.data.Dataset.from_tensor_slices(ex["captions"]).map(
        lambda caption: dict(ex, caption=caption))

  def to_example(ex) -> Example:
    captions = [_text(c) for c in ex["captions"]]
    if per_caption:
      caption = _text(ex["caption"])
    else:
      caption = captions[0] if captions else ""
    return make_example(ex["image"], int(ex["image_id"]),
                        question_type="caption", caption=caption,
                        captions=captions)

  ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
  if per_caption:
    ds = ds.flat_map(flatten)
  return _finish(ds, to_example, max_examples=max_examples,
                 shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                 batch_size=batch_size, drop_remainder=drop_remainder)
