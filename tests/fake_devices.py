"""Runs a test under several fake CPU devices: JAX fixes its device count at start-up, so a test that
needs 8 devices re-runs itself in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count``."""

import os
import pathlib
import subprocess
import sys

import jax

NUM_FAKE_DEVICES = 8


def fake_device_flags(num_devices: int = NUM_FAKE_DEVICES) -> str:
  """``XLA_FLAGS`` for a subprocess with `num_devices` fake CPU devices, keeping the suite's own flags."""
  return f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={num_devices}'


def rerun_with_fake_devices(test_file: str, test_name: str, num_devices: int = NUM_FAKE_DEVICES) -> bool:
  """Re-runs ``test_file::test_name`` with `num_devices` fake CPU devices unless this process has them.

  Returns True if it did (the caller then returns: the subprocess did the checks and passed).
  """
  if jax.device_count() >= num_devices:
    return False
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=fake_device_flags(num_devices))
  command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'{test_file}::{test_name}']
  result = subprocess.run(command, env=env, cwd=pathlib.Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0 and '1 passed' in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
  return True
