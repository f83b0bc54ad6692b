"""free_jax: BLIP-2 vision-language models with FREE early exits, in JAX/Flax.

``free_jax.load_pretrained(path, dtype)`` -> (model, params) loads a local HF BLIP-2 checkpoint; see
`free_jax.weights`. ``free_jax.save_pretrained(model, params, path, tokenizer)`` writes one (the
embedded model included) that `load_pretrained` and transformers read back; see `free_jax.export`.
``free_jax.EarlyExitVLM.load(workdir)`` is a trained early-exit VLM that generates; see `free_jax.vlm`.
The loaders are imported on first use, so ``import free_jax.data`` (or any other submodule) does not
pull in transformers and every model family.
"""

_LOADERS = ('load_pretrained', 'load_tokenizer', 'load_processor')
_EXPORTERS = ('save_pretrained',)
_OBJECTS = ('EarlyExitVLM',)

__all__ = list(_LOADERS + _EXPORTERS + _OBJECTS)


def __getattr__(name):
  if name in _LOADERS:
    from free_jax import weights  # pylint: disable=g-import-not-at-top
    return getattr(weights, name)
  if name in _EXPORTERS:
    from free_jax import export  # pylint: disable=g-import-not-at-top
    return getattr(export, name)
  if name in _OBJECTS:
    from free_jax import vlm  # pylint: disable=g-import-not-at-top
    return getattr(vlm, name)
  raise AttributeError(f'module free_jax has no attribute {name!r}')
