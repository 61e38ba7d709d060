"""Evaluates a trained checkpoint on the validation split: top-1 and top-5.

    python -m alexnet_jax.evaluate --workdir=DIR [--ten_crop]
        [--config=configs/NAME.py] [--store_dir=DIR] [--eval_batch_size=N]

Restores the latest checkpoint in DIR (or --step) with the config the run was
trained with (DIR/config.json; --config replaces it) and prints the accuracy
on the centre patch, or with --ten_crop the paper's figure: the softmax
averaged over ten patches, the four corners and the centre and their
reflections (section 4.1).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import (checkpointing, data, models, optim, parallel, runs,
                         runtime, train, validation)

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The training run\'s directory.')
flags.DEFINE_bool('ten_crop', False, 'Average the softmax over the ten '
                  'patches of section 4.1 instead of using the centre patch.')
flags.DEFINE_integer('step', None, 'The checkpoint to evaluate (default: the '
                     'latest).')
flags.DEFINE_string('store_dir', None, 'The prepared store, if not the '
                    'config\'s store_dir.')
flags.DEFINE_integer('eval_batch_size', None, 'Overrides the config\'s; ten '
                     'patches make every example ten times the memory.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file that '
                                'replaces WORKDIR/config.json.',
                                lock_config=False)
flags.mark_flags_as_required(['workdir'])


def evaluate_checkpoint(config, workdir: str, *, ten_crop: bool = False,
                        step: int | None = None) -> dict:
  """{'step', 'patches', 'loss', 'top1', 'top5'} of a checkpoint in `workdir`
  on the validation split of `config.store_dir`; top-k as fractions."""
  config = config.copy_and_resolve_references()  # the caller's stays as it is
  validation.check_config(config)
  with jax.enable_x64(config.model.dtype == 'float64'):
    return _evaluate_checkpoint(config, workdir, ten_crop, step)


def _evaluate_checkpoint(config, workdir, ten_crop, step):
  if ten_crop and config.dataset not in ('imagenet2012', 'folder'):
    raise validation.ConfigError(
        f'--ten_crop needs a prepared store; config.dataset={config.dataset!r}'
        ' has no 256x256 images to take ten patches from')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'No checkpoints in {workdir}.')
  devices = train.select_devices(config)
  scheme = parallel.make_scheme(config.parallelism, devices,
                                tuple(config.mesh_shape))
  validation.check_layout(config, scheme, jax.process_count())
  image_size = validation.image_size(config)
  with config.unlocked():
    config.ten_crop_eval = ten_crop
  dataset = data.get_dataset(config, image_size)
  validation.check_dataset(config, dataset)

  model = models.from_config(config)
  tx = optim.make_optimizer(config)
  state, shardings = train.create_train_state(model, tx, scheme, image_size,
                                              config.seed)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise FileNotFoundError(f'No checkpoint {"" if step is None else step} '
                              f'in {ckpt.directory}; it has '
                              f'{ckpt.all_steps()}.')
    state, _, _ = ckpt.restore(step, checkpointing.abstract(state, shardings),
                               optim.init_schedule_state(config))
  finally:
    ckpt.close()
  eval_step = train.make_eval_step(model, scheme, shardings['params'])
  result = train.evaluate(eval_step, state['params'], dataset, scheme, config)
  return {'step': step, 'patches': 10 if ten_crop else 1, **result}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax logs every file it reads at INFO; the result is what matters here.
  logging.set_verbosity(logging.WARNING)
  try:
    config = FLAGS.config or runs.load_config(FLAGS.workdir)
    with config.unlocked():
      if FLAGS.store_dir:
        config.store_dir = FLAGS.store_dir
      if FLAGS.eval_batch_size:
        config.eval_batch_size = FLAGS.eval_batch_size
    runtime.setup(config)  # simulated CPU devices and jax.distributed
    result = evaluate_checkpoint(config, FLAGS.workdir,
                                 ten_crop=FLAGS.ten_crop, step=FLAGS.step)
  except (validation.ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    view = 'ten patches' if FLAGS.ten_crop else 'centre patch'
    print(f"step {result['step']} ({view}): top-1 {result['top1']:.2%} "
          f"(error {1 - result['top1']:.2%})  top-5 {result['top5']:.2%} "
          f"(error {1 - result['top5']:.2%})  loss {result['loss']:.4f}")
    print(json.dumps(result))


if __name__ == '__main__':
  app.run(main, flags_parser=runtime.parse_flags)
