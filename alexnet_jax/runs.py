"""A run's directory as something to load: its config and its parameters.

A run is `WORKDIR/config.json` (the config it was trained with) and orbax
checkpoints in `WORKDIR/checkpoints`. `evaluate`, `predict`, fine-tuning
(`config.init_from`) and the notebooks read runs through these functions, and
`convert` writes published weights as a run of the same form, so everything
that loads a trained network loads converted weights too.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import checkpointing, models, optim, validation

CONFIG_FILE = 'config.json'


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  params: dict       # NumPy arrays, the single-device parameter tree
  step: int

  def model(self):
    return models.from_config(self.config)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not the directory of a run, or '
        'pass --config=the config file the run was trained with (and its '
        '--config.FIELD overrides).')
  with open(path) as f:
    saved = json.load(f)
  # A field added since the run was written keeps its default value.
  from configs import default  # beside the package, as the config files are
  config = default.get_config()
  _overlay(config, saved)
  return config


def _overlay(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key),
                                              ml_collections.ConfigDict):
      _overlay(config[key], value)
    elif key in config and config.get_ref(key).get_type() is tuple:
      config[key] = tuple(value)  # JSON has no tuples
    else:
      config[key] = value


def write_config(workdir: str, config) -> None:
  tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=1))
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def _x64(config):
  return jax.enable_x64(config.model.dtype == 'float64')


def abstract_state(config):
  """The train state of `config` as shapes and dtypes, nothing allocated."""
  model = models.from_config(config)
  tx = optim.make_optimizer(config)
  size = validation.image_size(config)
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images,
                                             train=False)['params'])
  return {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
          'opt_state': jax.eval_shape(tx.init, params)}


def restore(workdir: str, *, config=None, step: int | None = None) -> Run:
  """The parameters of a checkpoint in `workdir` (default: the latest) as
  NumPy arrays, with the run's config (or `config`).

  Read through one device into host memory whatever the mesh the run trained
  on, so any scheme, device count or process count can use them.
  """
  config = config or load_config(workdir)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'No checkpoints in {workdir}.')
  validation.check_config(config)
  with _x64(config):
    # Onto this process's first device: a checkpoint remembers the devices
    # it was written from, which need not exist here.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        abstract_state(config))
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1 << 30,
                                      every_steps=1)
    try:
      steps = ckpt.all_steps()
      step = ckpt.latest_step() if step is None else step
      if step is None or step not in steps:
        raise FileNotFoundError(
            f'No checkpoint {"" if step is None else step} in '
            f'{ckpt.directory}; it has {steps}.')
      state, _, _ = ckpt.restore(step, target, optim.init_schedule_state(config))
    finally:
      ckpt.close()
  return Run(config, jax.device_get(state['params']), step)


def write(workdir: str, config, params) -> None:
  """Makes `workdir` a run of `config` whose step-0 checkpoint holds `params`
  (a parameter tree of NumPy arrays, as `abstract_state(config)` shapes it).

  Refuses a workdir that already holds checkpoints rather than mixing them.
  """
  validation.check_config(config)
  with _x64(config):
    expected = abstract_state(config)['params']
  problems = _mismatches(expected, params)
  if problems:
    raise ValueError('The parameters do not fit the config: '
                     + '; '.join(problems))
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1, every_steps=1)
  try:
    if ckpt.all_steps():
      raise FileExistsError(
          f'{ckpt.directory} already holds checkpoints {ckpt.all_steps()}; '
          'choose an empty --workdir.')
    with _x64(config):
      # On the default device; a run restores onto any mesh.
      params = jax.tree.map(lambda value, like: jnp.asarray(value, like.dtype),
                            params, expected)
      state = {'step': jnp.zeros((), jnp.int32), 'params': params,
               'opt_state': optim.make_optimizer(config).init(params)}
      ckpt.save(0, state, optim.init_schedule_state(config),
                {'step': 0, 'eval': None}, force=True)
      ckpt.wait()
  finally:
    ckpt.close()
  write_config(workdir, config)


def _mismatches(expected, params) -> list[str]:
  flat_expected = {jax.tree_util.keystr(k): v for k, v in
                   jax.tree_util.tree_flatten_with_path(expected)[0]}
  flat_given = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(params)[0]}
  problems = [f'{k} is missing' for k in flat_expected if k not in flat_given]
  problems += [f'{k} is not in the model' for k in flat_given
               if k not in flat_expected]
  problems += [f'{k} is {tuple(np.shape(flat_given[k]))}, the model has '
               f'{tuple(v.shape)}' for k, v in flat_expected.items()
               if k in flat_given and tuple(np.shape(flat_given[k])) != v.shape]
  return problems


# AlexNet fields that change the function a set of parameters computes; the
# others (classes, dropout, dtype, initialisation) may change when
# fine-tuning.
FUNCTION_FIELDS = ('variant', 'width', 'activation', 'use_lrn', 'lrn_n',
                   'lrn_k', 'lrn_alpha', 'lrn_beta', 'lrn_across_columns',
                   'pool_window', 'pool_stride')


def start_from(workdir: str, config, params, shardings
               ) -> tuple[dict, list[str]]:
  """`params` (a fresh initialisation) with every layer that `workdir`'s
  latest checkpoint has in the same shapes replaced by that run's values,
  placed with `shardings`; returns them and the layers left fresh.

  Only fc8 may be left fresh (a new classifier for another set of classes);
  any other difference, or a model field of FUNCTION_FIELDS that differs,
  means `config` does not describe the network the run trained: an error. A
  different input normalisation is allowed (another dataset may need its
  own) but logged, since the parameters expect theirs.
  """
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    raise FileNotFoundError(
        f'config.init_from={workdir!r} is not a run: it has no {CONFIG_FILE}. '
        'Give the --workdir of a trained run, or one that '
        '`python -m alexnet_jax.convert` wrote.')
  source = restore(workdir)
  theirs, ours = source.model(), models.from_config(config)
  differ = [f for f in FUNCTION_FIELDS
            if getattr(theirs, f) != getattr(ours, f)]
  if differ:
    raise validation.ConfigError(
        f'config.init_from={workdir!r} holds a network with ' + ', '.join(
            f'{f}={getattr(theirs, f)!r}' for f in differ)
        + ', this config one with ' + ', '.join(
            f'{f}={getattr(ours, f)!r}' for f in differ)
        + ': set the config.model fields as that run has them (its '
        'config.json).')
  theirs_norm = source.config.get('input', {}).get('normalization',
                                                   'mean_image')
  if theirs_norm != config.input.normalization:
    logging.warning(
        'config.init_from=%r was trained with input.normalization=%r; this '
        'run uses %r.', workdir, theirs_norm, config.input.normalization)
  out, fresh = {}, []
  for layer, leaves in params.items():
    theirs = source.params.get(layer)
    if theirs is not None and not _mismatches(leaves, theirs):
      out[layer] = jax.tree.map(
          lambda value, like, sharding: jax.device_put(
              np.asarray(value, like.dtype), sharding),
          theirs, leaves, shardings[layer])
    else:
      fresh.append(layer)
      out[layer] = leaves
  different = [layer for layer in fresh if layer != 'fc8']
  if different:
    layer = different[0]
    theirs = source.params.get(layer)
    shapes = ('absent' if theirs is None else
              str(jax.tree.map(np.shape, theirs)))
    raise validation.ConfigError(
        f'config.init_from={workdir!r}: layer {layer} there is {shapes}, here '
        f'{jax.tree.map(np.shape, params[layer])}. Only fc8 (the classifier) '
        'may differ: keep the model fields (variant, width, activation) of '
        'the run it starts from.')
  return out, fresh
