"""Tests for free_jax.data.tfds_pipelines on tfds.testing.mock_data."""

import re

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from free_jax.data import preprocess
from free_jax.data import tfds_pipelines

_DATA_DIR = "/nonexistent/tfds"  # mock_data never touches it.
_NUM_IMAGES = 3
_SIZE = 16


def _raw_records(name, split="train"):
  """The mocked dataset as tfds itself returns it (numpy dicts)."""
  return list(tfds.as_numpy(tfds.load(name, split=split, data_dir=_DATA_DIR)))


def _check_schema(example, image_shape):
  assert set(example) == set(tfds_pipelines.EXAMPLE_KEYS)
  assert example["image"].dtype == np.uint8
  assert example["image"].shape == image_shape
  for key in ("question", "answer", "question_type", "caption"):
    assert isinstance(example[key], str), key
  for key in ("answers", "captions"):
    assert all(isinstance(s, str) for s in example[key]), key


def _text(b):
  return b.decode("utf-8")


@pytest.fixture(scope="module")
def clevr():
  """(raw records, examples at original size) under one mock."""
  with tfds.testing.mock_data(num_examples=_NUM_IMAGES):
    raw = _raw_records("clevr")
    examples = list(tfds_pipelines.load_clevr_vqa(
        "train", _DATA_DIR, image_size=None))
  return raw, examples


def test_clevr_flattens_question_answers_in_file_order(clevr):
  raw, examples = clevr
  expected = []
  for rec in raw:  # Independent flattening of the nested Sequence feature.
    qa = rec["question_answer"]
    for i, (q, a) in enumerate(zip(qa["question"], qa["answer"])):
      expected.append((f"{_text(rec['file_name'])}#{i}", _text(q), _text(a),
                       rec["image"]))
  assert len(examples) == len(expected) > _NUM_IMAGES
  for ex, (ex_id, question, answer, image) in zip(examples, expected):
    _check_schema(ex, image.shape)
    assert (ex["id"], ex["question"], ex["answer"]) == (ex_id, question,
                                                        answer)
    assert ex["answers"] == [answer]
    assert ex["caption"] == "" and ex["captions"] == []
    np.testing.assert_array_equal(ex["image"], image)


def test_clevr_resizes_images():
  with tfds.testing.mock_data(num_examples=1):
    raw = _raw_records("clevr")[0]
    ex = next(tfds_pipelines.load_clevr_vqa("train", _DATA_DIR,
                                            image_size=_SIZE))
  _check_schema(ex, (_SIZE, _SIZE, 3))
  expected = Image.fromarray(raw["image"]).resize((_SIZE, _SIZE),
                                                 Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(ex["image"], np.asarray(expected))
  # Pre-resized images give the model exactly the pixels HF would.
  np.testing.assert_array_equal(
      preprocess.preprocess_images([ex["image"]], _SIZE),
      preprocess.preprocess_images([raw["image"]], _SIZE))


def _clevr_records(num_images=4):
  """Hand-written CLEVR records with meaningful answers."""
  answers = ["yes", "3", "cube", "red", "metal", "large", "no", "what"]
  for i in range(num_images):
    yield {
        "image": np.full((8, 8, 3), i, np.uint8),
        "file_name": f"CLEVR_train_{i:06d}.png",
        "question_answer": {
            "question": [f"q{i}-{j}" for j in range(len(answers))],
            "answer": answers,
        },
    }


def _clevr_as_dataset(self, *args, **kwargs):
  del self, args, kwargs
  return tf.data.Dataset.from_generator(_clevr_records, output_signature={
      "image": tf.TensorSpec((None, None, 3), tf.uint8),
      "file_name": tf.TensorSpec((), tf.string),
      "question_answer": {"question": tf.TensorSpec((None,), tf.string),
                          "answer": tf.TensorSpec((None,), tf.string)},
  })


@pytest.fixture(scope="module")
def clevr_controlled():
  """Loader outputs on hand-written records, for several settings."""
  with tfds.testing.mock_data(as_dataset_fn=_clevr_as_dataset):
    load = lambda **kw: list(tfds_pipelines.load_clevr_vqa(
        "train", _DATA_DIR, image_size=_SIZE, **kw))
    return {
        "plain": load(),
        "seed0": load(shuffle_seed=0),
        "seed0_again": load(shuffle_seed=0),
        "seed1": load(shuffle_seed=1),
        "first10_seed0": load(max_examples=10, shuffle_seed=0),
        "batches": load(batch_size=5, max_examples=12),
        "batches_drop": load(batch_size=5, max_examples=12,
                             drop_remainder=True),
    }


def test_clevr_question_types_from_answers(clevr_controlled):
  types = {ex["answer"]: ex["question_type"]
           for ex in clevr_controlled["plain"]}
  assert types == {"yes": "yes/no", "no": "yes/no", "3": "count",
                   "cube": "query_shape", "red": "query_color",
                   "metal": "query_material", "large": "query_size",
                   "what": "other"}


def test_clevr_shuffle_is_seeded_permutation(clevr_controlled):
  ids = {k: [ex["id"] for ex in v] for k, v in clevr_controlled.items()
         if not k.startswith("batches")}
  assert ids["plain"] == [f"CLEVR_train_{i:06d}.png#{j}"
                          for i in range(4) for j in range(8)]
  assert ids["seed0"] == ids["seed0_again"]
  assert ids["seed0"] != ids["seed1"] and ids["seed0"] != ids["plain"]
  assert sorted(ids["seed0"]) == sorted(ids["plain"])
  # max_examples keeps the first N in file order, then shuffles them.
  assert sorted(ids["first10_seed0"]) == sorted(ids["plain"][:10])
  # Images stay attached to their questions through the shuffle.
  for ex in clevr_controlled["seed0"]:
    image_index = int(ex["id"].split("_")[2].split(".")[0])
    assert ex["question"].startswith(f"q{image_index}-")
    np.testing.assert_array_equal(ex["image"], image_index)


def test_clevr_batches(clevr_controlled):
  batches = clevr_controlled["batches"]
  assert [b["image"].shape for b in batches] == [(5, _SIZE, _SIZE, 3)] * 2 + [
      (2, _SIZE, _SIZE, 3)]
  assert [len(b["question"]) for b in batches] == [5, 5, 2]
  assert set(batches[0]) == set(tfds_pipelines.EXAMPLE_KEYS)
  flat_ids = [i for b in batches for i in b["id"]]
  assert flat_ids == [ex["id"] for ex in clevr_controlled["plain"][:12]]
  assert len(clevr_controlled["batches_drop"]) == 2


@pytest.fixture(scope="module")
def coco():
  with tfds.testing.mock_data(num_examples=_NUM_IMAGES):
    return {
        "raw": _raw_records("coco_captions", "val"),
        "per_image": list(tfds_pipelines.load_coco_captions(
            "val", _DATA_DIR, image_size=_SIZE)),
        "per_caption": list(tfds_pipelines.load_coco_captions(
            "val", _DATA_DIR, image_size=_SIZE, per_caption=True)),
    }


def test_coco_captions_per_image(coco):
  assert len(coco["per_image"]) == len(coco["raw"]) == _NUM_IMAGES
  for ex, rec in zip(coco["per_image"], coco["raw"]):
    _check_schema(ex, (_SIZE, _SIZE, 3))
    captions = [_text(t) for t in rec["captions"]["text"]]
    assert ex["captions"] == captions and len(captions) > 1
    assert ex["caption"] == captions[0]
    assert ex["id"] == int(rec["image/id"])
    assert ex["question_type"] == "caption"
    assert (ex["question"], ex["answer"], ex["answers"]) == ("", "", [])


def test_coco_captions_per_caption(coco):
  expected = [(int(rec["image/id"]), _text(t))
              for rec in coco["raw"] for t in rec["captions"]["text"]]
  got = [(ex["id"], ex["caption"]) for ex in coco["per_caption"]]
  assert got == expected
  per_image = {ex["id"]: ex["captions"] for ex in coco["per_image"]}
  for ex in coco["per_caption"]:
    assert ex["captions"] == per_image[ex["id"]]


@pytest.mark.parametrize("loader, name", [
    (tfds_pipelines.load_clevr_vqa, "clevr"),
    (tfds_pipelines.load_coco_captions, "coco_captions"),
])
def test_missing_data_names_dataset_and_data_dir(tmp_path, loader, name):
  pattern = rf"'{name}'.*{re.escape(str(tmp_path))}"
  with pytest.raises(FileNotFoundError, match=pattern):
    loader("train", str(tmp_path))


def test_make_example_and_batching_errors():
  with pytest.raises(ValueError, match=r"example 'x': image must be uint8"):
    tfds_pipelines.make_example(np.zeros((4, 4), np.uint8), "x")
  examples = [tfds_pipelines.make_example(np.zeros((s, s, 3), np.uint8), s)
              for s in (4, 5)]
  with pytest.raises(ValueError, match="different shapes"):
    list(tfds_pipelines.batch_examples(examples, 2))
