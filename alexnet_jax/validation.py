"""Config checks that run before anything is compiled.

Every message names the field and the value, so a typo in a long override
fails in a second instead of after a compilation or an hour of training.
"""

from __future__ import annotations

from alexnet_jax import augment, data, models, parallel

# float64 (parameters too) is for comparing schemes free of round-off.
DTYPES = ('float32', 'bfloat16', 'float64')
# 'head': only fc8 learns (a new classifier on fixed features).
TRAINABLE = ('all', 'head')


class ConfigError(ValueError):
  """A config that cannot work."""


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _value(config, field: str):
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def _number(config, field: str):
  value = _value(config, field)
  _require(isinstance(value, (int, float)) and not isinstance(value, bool),
           f'config.{field}={value!r} must be a number')


def _choice(config, field: str, choices):
  value = _value(config, field)
  _require(value in choices,
           f'config.{field}={value!r} is not one of {tuple(choices)}')


def _positive(config, field: str, *, allow_zero=False, integer=False):
  value = _value(config, field)
  bad_type = not isinstance(value, (int, float)) or isinstance(value, bool)
  if integer:
    bad_type = bad_type or not isinstance(value, int)
  _require(not bad_type, f'config.{field}={value!r} must be a number'
           + (' (an integer)' if integer else ''))
  _require(value > 0 or (allow_zero and value == 0),
           f'config.{field}={value!r} must be '
           + ('non-negative' if allow_zero else 'positive'))


def image_size(config) -> int:
  if config.image_size == -1:
    return models.ARCHITECTURES[config.model.variant].image_size
  return config.image_size


def check_config(config) -> None:
  """Checks that need only the config."""
  m, o = config.model, config.optimizer
  _choice(config, 'model.variant', models.ARCHITECTURES)
  _choice(config, 'model.dtype', DTYPES)
  _choice(config, 'model.lrn', ('default', 'on', 'off'))
  _choice(config, 'model.init_scheme', ('paper', 'he'))
  _choice(config, 'model.activation', models.ACTIVATIONS)
  for field in models.LOWERINGS:
    _choice(config, f'model.{field}', models.lowering_choices(field))
  _choice(config, 'input.normalization', augment.NORMALIZATIONS)
  _choice(config, 'trainable', TRAINABLE)
  _choice(config, 'dataset', data.DATASETS)
  _choice(config, 'parallelism', parallel.SCHEMES)
  _choice(config, 'optimizer.schedule', ('plateau', 'step', 'constant'))
  _choice(config, 'optimizer.momentum_convention', ('paper', 'torch'))
  _choice(config, 'optimizer.batch_scaling', ('none', 'sqrt', 'linear_conv'))
  # Compared below: a string or None would raise TypeError there.
  _number(config, 'model.dropout_rate')
  _number(config, 'optimizer.plateau_factor')
  for field in ('ten_crop_eval', 'optimizer.decay_biases',
                'model.lrn_across_columns'):
    value = _value(config, field)
    _require(isinstance(value, bool),
             f'config.{field}={value!r} must be True or False')
  for field in ('store_dir', 'init_from'):
    value = config[field]
    _require(value is None or (isinstance(value, str) and value != ''),
             f'config.{field}={value!r} must be a directory (a string)')
  _require(config.trainable == 'all' or config.init_from is not None,
           f'config.trainable={config.trainable!r} trains a new head on '
           'parameters that come from somewhere: set config.init_from to the '
           'workdir of a trained or converted run')
  shape = config.mesh_shape
  _require(isinstance(shape, (tuple, list)) and len(shape) in (0, 2)
           and all(isinstance(s, int) and not isinstance(s, bool)
                   and (s > 0 or s == -1) for s in shape)
           and list(shape).count(-1) <= 1,
           f'config.mesh_shape={shape!r} must be () or (data, model): '
           'positive integers, one of which may be -1')
  _require(0.0 <= m.dropout_rate < 1.0,
           f'config.model.dropout_rate={m.dropout_rate!r} must be in [0, 1)')
  for field in ('model.num_classes', 'model.lrn_n', 'model.pool_window',
                'model.pool_stride', 'batch_size', 'eval_batch_size',
                'num_epochs', 'log_every_steps', 'checkpoint_every_steps',
                'max_checkpoints_to_keep', 'optimizer.plateau_patience',
                'optimizer.step_epochs', 'optimizer.reference_batch_size',
                'cpu_devices', 'synthetic.num_train', 'synthetic.num_eval'):
    _positive(config, field, integer=True)
  for field in ('model.width', 'model.lrn_alpha', 'model.lrn_beta',
                'optimizer.learning_rate'):
    _positive(config, field)
  for field in ('model.lrn_k', 'optimizer.weight_decay',
                'optimizer.plateau_threshold', 'optimizer.momentum',
                'input.lighting_sigma'):
    _positive(config, field, allow_zero=True)
  # A negative seed: np.random.default_rng([seed, epoch]) refuses it.
  for field in ('input.processes', 'optimizer.max_drops', 'seed'):
    _positive(config, field, allow_zero=True, integer=True)
  _require(m.lrn_n % 2 == 1,
           f'config.model.lrn_n={m.lrn_n} must be odd (a window centred on '
           'each channel)')
  _require(o.momentum < 1, f'config.optimizer.momentum={o.momentum} must be < 1')
  _require(0 < o.plateau_factor < 1,
           f'config.optimizer.plateau_factor={o.plateau_factor} must be in (0, 1)')
  _require(o.plateau_threshold > 0 or o.schedule != 'plateau',
           f'config.optimizer.plateau_threshold={o.plateau_threshold!r} must '
           "be positive for the 'plateau' schedule")
  for field in ('num_train_steps', 'eval_every_steps', 'image_size',
                'num_devices', 'input.workers'):
    value = _value(config, field)
    _require(isinstance(value, int) and not isinstance(value, bool)
             and (value == -1 or value > 0),
             f'config.{field}={value!r} must be -1 or a positive integer')

  size = image_size(config)
  sizes = models.feature_map_sizes(size, m.variant, m.pool_window,
                                   m.pool_stride)
  too_small = [name for name, s in sizes.items() if s < 1]
  if too_small:
    smallest = next(s for s in range(1, 4096) if min(models.feature_map_sizes(
        s, m.variant, m.pool_window, m.pool_stride).values()) >= 1)
    raise ConfigError(
        f'config.image_size={size} is too small for the {m.variant!r} network '
        f'with {m.pool_window}/{m.pool_stride} pooling: {too_small[0]} would '
        f'be empty; the smallest input is {smallest}')

  arch = models.ARCHITECTURES[m.variant]
  if config.parallelism == 'two_column':
    _require(m.variant == 'original',
             "config.parallelism='two_column' splits the two columns of the "
             f"'original' network; config.model.variant={m.variant!r} has one")
    _require(not m.lrn_across_columns,
             'config.model.lrn_across_columns=True needs both columns\' maps '
             "in one place; parallelism='two_column' keeps them on two devices")
  column_split = 2 if config.parallelism == 'two_column' else 1
  for name, features in zip(models.CONV_LAYERS, arch.conv_features):
    width = max(1, int(round(features * m.width)))
    per_column = arch.columns * column_split
    _require(width % per_column == 0,
             f'config.model.width={m.width} gives {name} {width} kernels, '
             f'which do not split into {per_column} equal parts')


def check_layout(config, scheme: parallel.Scheme, process_count: int) -> None:
  """Checks that need the mesh."""
  m = config.model
  shards = scheme.batch_shards
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    _require(value % shards == 0,
             f'config.{field}={value} is not divisible by the {shards} devices '
             f'that split the batch ({scheme.name} on mesh '
             f'{dict(scheme.mesh.shape)})')
    _require(value % process_count == 0,
             f'config.{field}={value} is not divisible by the '
             f'{process_count} processes')
  fc_shards = scheme.model_fields.get('fc_shards', 1)
  fc = max(1, int(round(models.ARCHITECTURES[m.variant].fc_features * m.width)))
  _require(fc % fc_shards == 0,
           f'config.model.width={m.width} gives fc6 {fc} neurons, which do '
           f'not split over {fc_shards} devices')
  if scheme.name == 'weird_trick':
    # The FC layers see the whole batch; the convs a 1/k share of it.
    _require(config.batch_size >= shards,
             f'config.batch_size={config.batch_size} is smaller than the '
             f'{shards} devices')


def check_dataset(config, dataset: data.Dataset) -> None:
  _require(dataset.num_classes == config.model.num_classes,
           f'config.model.num_classes={config.model.num_classes} but dataset '
           f'{dataset.name!r} has {dataset.num_classes} classes; run with '
           f'--config.model.num_classes={dataset.num_classes}')
  _require(dataset.steps_per_epoch(config.batch_size) > 0,
           f'config.batch_size={config.batch_size} is larger than the '
           f'{dataset.num_train} training examples of {dataset.name!r}')
