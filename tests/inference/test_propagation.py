"""Tests for free_jax.inference.propagation: which slots and segments wait for their K/V."""

import jax.numpy as jnp
import numpy as np

from free_jax.inference import propagation


def test_record_marks_the_steps_slots_after_its_exit():
  # A region of 5 slots starting at cache slot 3, 3 segments (2 exits + the final one).
  region = propagation.Pending.empty(1, 5, 2, 3, first_slot=3, dtype=jnp.float32)
  h = jnp.arange(4.0).reshape(1, 2, 2)
  region = region.record(jnp.asarray(4, jnp.int32), h, 0)  # a 2-token step at slots 4, 5 left at exit 0
  np.testing.assert_array_equal(region.missing, [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(region.h[0, 1:3], h[0])
  region = region.record(jnp.asarray(7, jnp.int32), h[:, :1], 1)  # a 1-token step at slot 7 left at exit 1
  np.testing.assert_array_equal(region.missing, [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 1]])
