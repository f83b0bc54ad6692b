"""Tests for free_jax.data.vqav2 on a tiny fixture in the official layout."""

import dataclasses
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from free_jax.data import tfds_pipelines
from free_jax.data import vqav2

# image_id -> (colour, size); image 4 is a corrupt file.
_IMAGES = {1: ((200, 30, 30), (40, 30)), 2: ((30, 200, 30), (24, 24)),
           3: ((30, 30, 200), (32, 48))}
_BROKEN_ID = 4
# (question_id, image_id, question, 10 answers, multiple_choice_answer)
_QUESTIONS = [
    (10, 1, "What color is the square?", ["red"] * 8 + ["orange"] * 2, "red"),
    (11, 1, "Is it a square?", ["yes"] * 10, "yes"),
    (20, 2, "How many squares?", ["1"] * 6 + ["one"] * 4, "1"),
    (40, _BROKEN_ID, "What is this?", ["noise"] * 10, "noise"),
    (41, _BROKEN_ID, "Is it broken?", ["yes"] * 10, "yes"),
    (30, 3, "What color is it?", ["blue"] * 5 + ["navy"] * 5, "blue"),
]


def _write_split(root, split, with_annotations=True):
  files = vqav2.VQAv2Files.standard(str(root), split)
  os.makedirs(files.images_dir)
  for image_id, (colour, (w, h)) in _IMAGES.items():
    Image.new("RGB", (w, h), colour).save(os.path.join(
        files.images_dir, files.image_pattern.format(image_id=image_id)))
  with open(os.path.join(files.images_dir, files.image_pattern.format(
      image_id=_BROKEN_ID)), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  with open(files.questions, "w") as f:
    json.dump({"questions": [
        {"question_id": q, "image_id": i, "question": text}
        for q, i, text, _, _ in _QUESTIONS]}, f)
  if with_annotations:
    with open(files.annotations, "w") as f:
      json.dump({"annotations": [
          {"question_id": q, "image_id": i,
           "answers": [{"answer": a, "answer_confidence": "yes",
                        "answer_id": k + 1} for k, a in enumerate(answers)],
           "multiple_choice_answer": mc, "answer_type": "other",
           "question_type": text.lower().split(" ")[0]}
          for q, i, text, answers, mc in _QUESTIONS]}, f)
  return files


@pytest.fixture
def val_files(tmp_path):
  return _write_split(tmp_path, "val")


def test_reads_questions_answers_and_images(val_files):
  examples = list(vqav2.load_vqav2(val_files, image_size=16))
  readable = [q for q in _QUESTIONS if q[1] != _BROKEN_ID]
  assert [ex["id"] for ex in examples] == [q[0] for q in readable]
  for ex, (_, image_id, text, answers, mc) in zip(examples, readable):
    assert set(ex) == set(tfds_pipelines.EXAMPLE_KEYS)
    assert ex["question"] == text
    assert ex["answers"] == answers and ex["answer"] == mc
    assert ex["question_type"] == text.lower().split(" ")[0]
    assert (ex["caption"], ex["captions"]) == ("", [])
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    # A flat-colour image stays that colour (JPEG may shift it slightly).
    np.testing.assert_allclose(ex["image"].reshape(-1, 3).mean(0),
                               _IMAGES[image_id][0], atol=4)


def test_broken_image_is_skipped_with_one_warning(val_files, caplog):
  with caplog.at_level(logging.WARNING):
    examples = list(vqav2.load_vqav2(val_files, image_size=None))
  assert _BROKEN_ID not in {ex["id"] // 10 for ex in examples}
  assert len(examples) == len(_QUESTIONS) - 2
  assert examples[0]["image"].shape == (30, 40, 3)  # original size kept
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  assert "skipped 2 questions" in message and "1 files" in message
  assert f"COCO_val2014_{_BROKEN_ID:012d}.jpg" in message


def test_answer_falls_back_to_most_common(tmp_path):
  files = _write_split(tmp_path, "train")
  with open(files.annotations) as f:
    data = json.load(f)
  for ann in data["annotations"]:
    del ann["multiple_choice_answer"]
  with open(files.annotations, "w") as f:
    json.dump(data, f)
  records = vqav2.read_records(files)
  assert [r["answer"] for r in records] == [q[4] for q in _QUESTIONS]


def test_test_split_has_no_answers(tmp_path):
  files = _write_split(tmp_path, "test-dev", with_annotations=False)
  assert files.annotations is None
  assert files.images_dir.endswith("test2015")
  examples = list(vqav2.load_vqav2(files, image_size=8))
  assert len(examples) == len(_QUESTIONS) - 2
  assert all(ex["answers"] == [] and ex["answer"] == "" for ex in examples)


@pytest.mark.parametrize("field", ["questions", "annotations", "images_dir"])
def test_missing_file_is_named(val_files, field):
  missing = getattr(val_files, field) + ".missing"
  files = dataclasses.replace(val_files, **{field: missing})
  with pytest.raises(FileNotFoundError, match=missing):
    vqav2.load_vqav2(files)


def test_bad_json_and_missing_annotation(val_files):
  with open(val_files.annotations, "w") as f:
    json.dump({"annotations": []}, f)
  with pytest.raises(ValueError, match="no annotation for question_id 10"):
    vqav2.read_records(val_files)
  with open(val_files.questions, "w") as f:
    json.dump([1, 2], f)
  with pytest.raises(ValueError, match="'questions' list"):
    vqav2.read_records(val_files)
  with pytest.raises(ValueError, match="unknown VQAv2 split 'dev'"):
    vqav2.VQAv2Files.standard("/data", "dev")


def test_shuffle_and_batches(val_files):
  load = lambda **kw: list(vqav2.load_vqav2(val_files, image_size=8, **kw))
  plain = [ex["id"] for ex in load()]
  seeded = [ex["id"] for ex in load(shuffle_seed=3)]
  assert seeded == [ex["id"] for ex in load(shuffle_seed=3)]
  assert sorted(seeded) == sorted(plain)
  assert seeded != plain
  assert [ex["id"] for ex in load(max_examples=3)] == [10, 11, 20]
  batches = load(batch_size=3)
  assert [b["image"].shape for b in batches] == [(3, 8, 8, 3), (1, 8, 8, 3)]
  assert [i for b in batches for i in b["id"]] == plain
