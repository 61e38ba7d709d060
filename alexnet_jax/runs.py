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
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
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
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1)
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
                {'step': 0, 'eval': None})
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
  # Arrays, ShapeDtypeStructs or orbax's metadata of stored arrays.
  shape = lambda v: tuple(getattr(v, 'shape', None) or np.shape(v))
  problems += [f'{k} is {shape(flat_given[k])}, the model has '
               f'{tuple(v.shape)}' for k, v in flat_expected.items()
               if k in flat_given and shape(flat_given[k]) != tuple(v.shape)]
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


# The fields a run resumed from its workdir may change: where and on how many
# devices it runs (and so how some operations are lowered, which computes the
# same function), for how long, how often it logs and checkpoints, and how
# its input is read. The others define the network, the data each step sees
# and the optimization (the evaluation cadence feeds the plateau schedule),
# which the checkpoints continue only as they are.
RESUMABLE_CHANGES = (
    'parallelism', 'mesh_shape', 'num_devices', 'cpu_devices', 'num_epochs',
    'num_train_steps', 'log_every_steps', 'checkpoint_every_steps',
    'max_checkpoints_to_keep', 'eval_batch_size', 'input.workers',
    'input.processes', 'store_dir', 'init_from',
    *(f'model.{field}' for field in models.LOWERINGS))


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


def check_resumable(config, workdir: str) -> None:
  """Before a run resumes from `workdir`'s checkpoints: `config` must be the
  run's own, up to RESUMABLE_CHANGES. Compared with its config.json or, for a
  workdir without one, with the latest checkpoint's parameter shapes; a
  difference raises a ConfigError naming each field with both values."""
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      return  # nothing to resume: the run starts afresh
    if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
      theirs = _flat(load_config(workdir).to_dict())
      ours = _flat(config.to_dict())
      fields = [k for k in sorted(set(ours) | set(theirs))
                if k not in RESUMABLE_CHANGES and ours.get(k) != theirs.get(k)]
      differences = [f'config.{k} is {ours.get(k)!r} here, {theirs.get(k)!r} '
                     'there' for k in fields]
      same_network = not any(k.split('.', 1)[-1] in FUNCTION_FIELDS + ('lrn',)
                             for k in fields if k.startswith('model.'))
    else:
      with _x64(config):
        expected = abstract_state(config)['params']
      differences = [f'in the checkpoint {problem}' for problem in
                     _mismatches(expected, ckpt.stored_params(step))]
      same_network = False
  finally:
    ckpt.close()
  if not differences:
    return
  shown = '; '.join(differences[:4]) + (
      f'; and {len(differences) - 4} more' if len(differences) > 4 else '')
  instead = ('give it a new --workdir' + (
      "; to start it from that run's parameters, a new --workdir and "
      f'--config.init_from={workdir}' if same_network else ''))
  raise validation.ConfigError(
      f'{workdir} holds checkpoints (the latest is step {step}) of a run that '
      f'this config does not continue: {shown}. A run resumed from its '
      'workdir may change only ' + ', '.join(RESUMABLE_CHANGES)
      + f'. To train this config, {instead}.')
