"""The paper's SGD and its learning-rate schedules (section 5).

The optimizer is optax; the learning rate is fed into it on every step
(`optax.inject_hyperparams`), because the paper's schedule reacts to validation
error, which only the host loop sees.
"""

from __future__ import annotations

import math

import jax
import optax
from optax import contrib


def _kernels_only(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == 'kernel', params)


def _head_or_frozen(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'train' if path[0].key == 'fc8' else 'frozen', params)


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum and weight decay.

  'paper' momentum folds the learning rate into the velocity, exactly as the
  paper writes it: v <- m*v - wd*lr*w - lr*grad; w <- w + v. 'torch' keeps the
  velocity free of it (v <- m*v + grad + wd*w; w <- w - lr*v), as PyTorch and
  optax.sgd do. They differ only just after a learning-rate drop.

  With `config.trainable='head'` only fc8 is updated (a new classifier on
  fixed features): the other layers' updates are zero whatever their
  gradients, so XLA can drop the backward pass below fc8.
  """
  o = config.optimizer
  mask = None if o.decay_biases else _kernels_only

  def sgd(learning_rate):
    decay = optax.add_decayed_weights(o.weight_decay, mask=mask)
    if o.momentum_convention == 'paper':
      return optax.chain(decay, optax.scale_by_learning_rate(learning_rate),
                         optax.trace(decay=o.momentum))
    return optax.chain(decay, optax.trace(decay=o.momentum),
                       optax.scale_by_learning_rate(learning_rate))

  if config.get('trainable', 'all') == 'head':
    sgd_all = sgd
    sgd = lambda learning_rate: optax.multi_transform(
        {'train': sgd_all(learning_rate), 'frozen': optax.set_to_zero()},
        _head_or_frozen)

  return optax.inject_hyperparams(sgd)(learning_rate=o.learning_rate)


def plateau(config) -> optax.GradientTransformationExtraArgs:
  """'Divide by 10 when the validation error stops improving' (section 5).

  Fed once per evaluation with the validation top-1 error; `min_scale` caps the
  number of drops (the paper reduced the rate three times).
  """
  o = config.optimizer
  return contrib.reduce_on_plateau(
      factor=o.plateau_factor, patience=o.plateau_patience,
      rtol=0.0, atol=o.plateau_threshold, cooldown=0,
      min_scale=o.plateau_factor ** o.max_drops)


def init_schedule_state(config):
  return plateau(config).init({})


def update_schedule_state(config, state, val_error: float):
  _, state = plateau(config).update({}, state, value=val_error)
  return state


def learning_rate(config, step: int, steps_per_epoch: int, schedule_state) -> float:
  """The learning rate for `step`: the plateau scale or the step schedule."""
  o = config.optimizer
  if o.schedule == 'plateau':
    return o.learning_rate * float(schedule_state.scale)
  if o.schedule == 'step':
    # Caffe's and torchvision's recipes: divide by 10 every `step_epochs`.
    drops = min(step // (o.step_epochs * steps_per_epoch), o.max_drops)
    return o.learning_rate * o.plateau_factor ** drops
  if o.schedule == 'constant':
    return o.learning_rate
  raise ValueError(f"config.optimizer.schedule must be 'plateau', 'step' or "
                   f"'constant', got {o.schedule!r}")


def layer_lr_multipliers(config, params):
  """Per-parameter learning-rate factors for a batch k times the reference.

  'none': 1 everywhere. 'sqrt': sqrt(k) everywhere (the theory in Krizhevsky
  2014, section 5). 'linear_conv': k for the conv layers and 1 for the FC
  layers, as in Krizhevsky's cuda-convnet2 configs (0.01, 0.02, 0.04 for
  batch 128, 256, 512), since the FC layers see every example in either case.
  Both momentum conventions are linear in the rate, so scaling a layer's
  update scales its rate.
  """
  o = config.optimizer
  k = config.batch_size / o.reference_batch_size
  rule = o.batch_scaling
  if rule == 'none':
    factor = lambda layer: 1.0
  elif rule == 'sqrt':
    factor = lambda layer: math.sqrt(k)
  elif rule == 'linear_conv':
    factor = lambda layer: k if layer.startswith('conv') else 1.0
  else:
    raise ValueError(f"config.optimizer.batch_scaling must be 'none', 'sqrt' "
                     f"or 'linear_conv', got {rule!r}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: factor(path[0].key), params)


def step_lr_multipliers(config, params):
  """`layer_lr_multipliers` as `train.make_train_step` takes them: None under
  'none', where every factor is 1 and the step need multiply nothing."""
  if config.optimizer.batch_scaling == 'none':
    return None
  return layer_lr_multipliers(config, params)
