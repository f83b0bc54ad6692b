"""Sort-of-CLEVR generator: determinism, split independence, answers/pixels/captions vs metadata."""

import collections
import math
import re

import numpy as np
import pytest

from free_jax.data import sort_of_clevr as soc

N = 600  # a few blocks: enough for every question type to occur ~55 times.


@pytest.fixture(scope='module')
def data():
  return soc.generate(N, seed=3, question_types=soc.QUESTION_TYPES)


def _object(d, i, k):
  o = d['objects']
  return (soc.COLOURS[o['colour'][i, k]], soc.SHAPES[o['shape'][i, k]], int(o['x'][i, k]),
          int(o['y'][i, k]))


def _scene(d, i):
  return [_object(d, i, k) for k in range(d['objects']['colour'].shape[1])]


def _assert_equal_examples(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], dict):
      _assert_equal_examples(a[key], b[key])
    else:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_same_seed_same_data_and_prefix_stable(data):
  _assert_equal_examples(data, soc.generate(N, seed=3, question_types=soc.QUESTION_TYPES))
  _assert_equal_examples(soc.generate(300, seed=3, question_types=soc.QUESTION_TYPES), _first_rows(data, 300))


def _first_rows(d, n):
  return {k: _first_rows(v, n) if isinstance(v, dict) else v[:n] for k, v in d.items()}


def test_seeds_and_splits_are_disjoint(data):
  other = soc.generate(N, seed=4)
  splits = [soc.make_split(s, 300, seed=3) for s in ('train', 'val', 'test')]
  hashes = [{im.tobytes() for im in d['image']} for d in [data, other] + splits]
  assert all(len(h) > 0.99 * len(d['image']) for h, d in zip(hashes, [data, other] + splits))
  for i in range(len(hashes)):
    for j in range(i + 1, len(hashes)):
      assert not hashes[i] & hashes[j], (i, j)
  _assert_equal_examples(splits[2], soc.make_split('test', 300, seed=3))


def _answer_from_scene(question, scene, image_size):
  """Independent derivation of the answer of one question from the object list."""
  by_colour = {c: (s, x, y) for c, s, x, y in scene}
  if m := re.fullmatch(r'what shape is the (\w+) object\?', question):
    return by_colour[m[1]][0]
  if m := re.fullmatch(r'what color is the only (\w+)\?', question):
    [colour] = [c for c, s, _, _ in scene if s == m[1]]
    return colour
  if m := re.fullmatch(r'do the (\w+) and (\w+) objects have the same shape\?', question):
    assert m[1] != m[2]
    return 'yes' if by_colour[m[1]][0] == by_colour[m[2]][0] else 'no'
  if m := re.fullmatch(r'how many other objects have the same shape as the (\w+) object\?', question):
    return ['zero', 'one', 'two', 'three', 'four', 'five'][
        sum(s == by_colour[m[1]][0] for c, s, _, _ in scene if c != m[1])]
  if m := re.fullmatch(r'is the (\w+) object on the left or right\?', question):
    return 'left' if by_colour[m[1]][1] < image_size / 2 else 'right'
  if m := re.fullmatch(r'is the (\w+) object at the top or bottom\?', question):
    return 'top' if by_colour[m[1]][2] < image_size / 2 else 'bottom'
  if m := re.fullmatch(r'is there a (\w+) (\w+)\?', question):
    return 'yes' if by_colour.get(m[1], (None,))[0] == m[2] else 'no'
  if m := re.fullmatch(r'how many (\w+)s are there\?', question):
    return ['zero', 'one', 'two', 'three', 'four', 'five', 'six'][
        sum(s == m[1] for _, s, _, _ in scene)]
  m = re.fullmatch(r'what (color|shape) is the object (nearest to|farthest from) the (\w+) object\?',
                   question)
  assert m, question
  _, x0, y0 = by_colour[m[3]]
  others = sorted((math.hypot(x - x0, y - y0), c, s) for c, s, x, y in scene if c != m[3])
  if m[2] == 'farthest from':
    others = others[::-1]
  assert abs(others[0][0] - others[1][0]) >= 1.0, 'the nearest/farthest object is ambiguous'
  # The same object on the lattice, uniquely: the answer never depends on pixel jitter.
  cell = image_size // 4
  lattice = sorted((math.hypot(x // cell - x0 // cell, y // cell - y0 // cell), c) for c, _, x, y in scene
                   if c != m[3])
  if m[2] == 'farthest from':
    lattice = lattice[::-1]
  assert lattice[0][0] != lattice[1][0] and lattice[0][1] == others[0][1], 'ambiguous on the lattice'
  return others[0][1] if m[1] == 'color' else others[0][2]


def test_answers_follow_from_scene(data):
  for i in range(N):
    assert data['answer'][i] == _answer_from_scene(data['question'][i], _scene(data, i), 64), i


@pytest.mark.parametrize('types', [soc.DEFAULT_QUESTION_TYPES, soc.QUESTION_TYPES])
def test_answers_are_balanced_per_type(types):
  d = soc.generate(4096, seed=11, question_types=types)
  counts = collections.defaultdict(collections.Counter)
  for t, a in zip(d['question_type'], d['answer']):
    counts[t][a] += 1
  assert set(counts) == set(types)
  for t, c in counts.items():
    options = soc.answers(t)
    assert set(c) == set(options), t
    uniform = sum(c.values()) / len(options)
    assert max(c.values()) <= 2 * uniform, (t, c)


def test_pixels_agree_with_metadata(data):
  image, o = data['image'], data['objects']
  rgb = {c: tuple(v) for c, v in zip(soc.COLOURS, soc.RGB)}
  yy, xx = np.mgrid[:64, :64]
  for i in range(50):
    covered = np.zeros((64, 64), bool)
    for k, (colour, shape, x, y) in enumerate(_scene(data, i)):
      r = int(o['size'][i, k])
      assert tuple(image[i, y, x]) == rgb[colour]
      # Bounding-box corners tell the shapes apart: a square fills all four, an up-pointing
      # triangle only the bottom two, a circle none.
      corners = [tuple(image[i, y + dy, x + dx]) == rgb[colour] for dy in (-r, r) for dx in (-r, r)]
      assert corners == {'square': [True] * 4, 'triangle': [False, False, True, True],
                         'circle': [False] * 4}[shape], (i, k, shape)
      covered |= (np.abs(xx - x) <= r) & (np.abs(yy - y) <= r)
    assert (image[i][~covered] == soc.BACKGROUND).all()
    present = {tuple(p) for p in image[i].reshape(-1, 3)} - {soc.BACKGROUND}
    assert present == {rgb[c] for c, _, _, _ in _scene(data, i)}


def test_captions_list_objects_left_to_right(data):
  for i in range(N):
    m = re.fullmatch(r'(.*) and a (\w+) (\w+) from left to right', data['caption'][i])
    said = [tuple(p.split()[1:]) for p in m[1].split(' , ')] + [(m[2], m[3])]
    order = sorted(_scene(data, i), key=lambda obj: (obj[2], obj[3]))
    assert said == [(c, s) for c, s, _, _ in order], i


def test_scene_constraints(data):
  o = data['objects']
  colours = np.sort(o['colour'], axis=1)
  assert (np.diff(colours, axis=1) > 0).all()  # distinct colours
  gap = np.maximum(np.abs(o['x'][:, :, None] - o['x'][:, None]),
                   np.abs(o['y'][:, :, None] - o['y'][:, None]))
  gap += 1000 * np.eye(o['x'].shape[1], dtype=int)
  assert (gap > 2 * o['size'][:, :1, None]).all()  # no two objects overlap
  assert data['image'].shape == (N, 64, 64, 3) and data['image'].dtype == np.uint8


def test_caption_task_and_options():
  d = soc.generate(10, seed=0, task='caption', image_size=32, num_objects=4)
  assert 'question' not in d and len(d['caption']) == 10
  assert d['image'].shape == (10, 32, 32, 3) and d['objects']['x'].shape == (10, 4)
  only = soc.generate(20, seed=0, question_types=('count', 'presence'))
  assert set(only['question_type']) == {'count', 'presence'}


@pytest.mark.parametrize('kwargs, message', [
    (dict(split='dev'), 'split'),
    (dict(image_size=50), 'image_size'),
    (dict(num_objects=9), 'num_objects'),
    (dict(question_types=('color',)), 'question_type'),
    (dict(task='vqa2'), 'task'),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    soc.make_split(kwargs.pop('split', 'train'), 4, seed=0, **kwargs)


def test_object_slots_describe_each_colour(data):
  slots = soc.object_slots(data['objects'], 64)
  for i in range(50):
    seen = {}
    for colour, shape, x, y in _scene(data, i):
      seen[soc.COLOURS.index(colour)] = (1 + soc.SHAPES.index(shape), 1 + x // 16, 1 + y // 16)
    for c in range(len(soc.COLOURS)):
      assert (slots['shape'][i, c], slots['column'][i, c], slots['row'][i, c]) == seen.get(c, (0, 0, 0))
  # Every object fills exactly one colour slot, and a slot is either wholly filled or wholly absent.
  filled = [slots[name] > 0 for name in ('shape', 'column', 'row')]
  np.testing.assert_array_equal(filled[0].sum(1), data['objects']['colour'].shape[1])
  np.testing.assert_array_equal(filled[0], filled[1])
  np.testing.assert_array_equal(filled[0], filled[2])
