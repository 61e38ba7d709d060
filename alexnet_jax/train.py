"""Training and evaluation: one train step for every parallel scheme.

The step computes gradients inside `jax.shard_map` (the model's collectives
decide what crosses devices) and applies the optax update outside it under
`jax.jit`, where the update is elementwise on arrays that already carry their
shardings. `train_and_evaluate` is the one entry point of the command line,
the notebooks and the tests.
"""

from __future__ import annotations

import collections
import math
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from alexnet_jax import (checkpointing, data, device_augment, metrics_io,
                         models, optim, parallel, runs, validation)
from alexnet_jax import workdir as workdir_lib

State = dict[str, Any]


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped before saving it."""


def select_devices(config) -> list:
  devices = jax.devices()
  wanted = config.num_devices
  if config.parallelism == 'none':
    wanted = 1
  if wanted == -1:
    return devices
  if jax.process_count() > 1 and wanted != len(devices):
    # A subset of the global devices would leave some processes without any.
    raise validation.ConfigError(
        f'config.num_devices={wanted} but {jax.process_count()} processes '
        f'share {len(devices)} devices; use --config.num_devices=-1 (all of '
        'them) when running on several processes.')
  if len(devices) < wanted:
    platform = devices[0].platform
    raise validation.ConfigError(
        f'config.num_devices={wanted} ({config.parallelism}) but this '
        f'machine has {len(devices)} {platform} device(s). Run a config for '
        f'{len(devices)} device(s) instead, e.g. configs/one_gpu.py or '
        f'--config.parallelism=data --config.num_devices={len(devices)}.')
  return devices[:wanted]


# The train state is a plain dict, so every scheme and the checkpoint share it.
def create_train_state(model: models.AlexNet, tx, scheme: parallel.Scheme,
                       image_size: int, seed: int):
  """Initialises the global parameters directly onto the mesh.

  Returns the state and its shardings (a tree of NamedSharding)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init = lambda: model.init(jax.random.key(seed), images, train=False)['params']
  param_specs = scheme.param_specs(jax.eval_shape(init), model)
  param_shardings = jax.tree.map(scheme.sharding, param_specs,
                                 is_leaf=lambda x: isinstance(x, P))
  params = jax.jit(init, out_shardings=param_shardings)()
  opt_shapes = jax.eval_shape(tx.init, params)
  replicated = scheme.sharding(P())
  opt_shardings = _opt_shardings(opt_shapes, params, param_shardings,
                                 replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {'step': jax.device_put(jnp.zeros((), jnp.int32), replicated),
           'params': params, 'opt_state': opt_state}
  shardings = {'step': replicated, 'params': param_shardings,
               'opt_state': opt_shardings}
  return state, shardings


def _opt_shardings(opt_shapes, params, param_shardings, replicated):
  """The optimizer state's shardings: a per-parameter buffer (momentum) is
  sharded like its parameter, anything else (the step count, the learning
  rate) replicated.

  A buffer is recognised by its path ending in the parameter's (layer, name)
  and by its shape. optax.tree_map_params would do this from the state's
  structure, but not across multi_transform's masked (frozen) branches.
  """
  by_name = {}
  for path, sharding in jax.tree_util.tree_flatten_with_path(
      param_shardings)[0]:
    key = tuple(k.key for k in path)
    by_name[key] = (sharding, _get(params, key).shape)

  def choose(path, leaf):
    key = tuple(getattr(k, 'key', None) for k in path[-2:])
    sharding, shape = by_name.get(key, (None, None))
    return sharding if shape == leaf.shape else replicated

  return jax.tree_util.tree_map_with_path(choose, opt_shapes)


def _get(tree, key):
  for k in key:
    tree = tree[k]
  return tree


def _metrics(logits, labels, weights):
  """Sums over the local examples: loss, top-1 and top-5 hits, count."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  hits = top_k == labels[:, None]
  return {'loss': jnp.sum(loss * weights),
          'top1': jnp.sum(hits[:, 0] * weights),
          'top5': jnp.sum(jnp.any(hits, axis=-1) * weights),
          'count': jnp.sum(weights)}


def _spec_axes(spec: P) -> set[str]:
  axes = set()
  for entry in spec:
    if isinstance(entry, tuple):
      axes.update(entry)
    elif entry is not None:
      axes.add(entry)
  return axes


def _to_varying(path, param, axes):
  if not axes:
    return param
  # Named after the layer, so that the communication report can tell which
  # parameter's gradient each all-reduce carries.
  with jax.named_scope(path[0].key):
    return jax.lax.pcast(param, axes, to='varying')


def make_grad_fn(model: models.AlexNet, scheme: parallel.Scheme, param_specs):
  """Returns `grad_fn(params, batch, rng, constants=None) -> (grads,
  metrics)` over the mesh.

  The batch is a dataset's (see `alexnet_jax.dataset`), which each device
  turns into network inputs with the dataset's `device_augment.Constants`.
  Gradients are of the mean loss over the global batch, with the parameters'
  own shardings; `metrics` holds that batch's mean loss, top-1 and top-5.
  """
  local_model = scheme.local_model(model)
  # Mesh axes over which each parameter is replicated while the batch is
  # split: its gradient is summed over them.
  replicated_over = jax.tree.map(
      lambda spec: tuple(a for a in scheme.batch_axes
                         if a not in _spec_axes(spec)),
      param_specs, is_leaf=lambda x: isinstance(x, P))

  def device_grads(params, batch, rng, constants):
    # Every device draws its own dropout masks: column halves and batch shards.
    rng = jax.random.fold_in(rng, parallel.device_index())
    images = device_augment.train_inputs(batch, constants)

    def loss_fn(params):
      # Marking the float32 parameters per-device here puts the gradient sum
      # (the transpose of this cast) on float32 values; left implicit, it
      # would happen after the model's cast to its compute dtype, in bfloat16.
      params = jax.tree_util.tree_map_with_path(
          _to_varying, params, replicated_over)
      logits = local_model.apply({'params': params}, images,
                                 train=True, rngs={'dropout': rng})
      sums = _metrics(logits, batch['label'], jnp.ones(logits.shape[0]))
      # The mean over the global batch. The gradient of a replicated
      # parameter is summed over the batch axes by the transpose of the cast
      # above, so no psum of the gradients follows.
      sums = jax.lax.psum(sums, scheme.batch_axes)
      means = {k: v / sums['count'] for k, v in sums.items() if k != 'count'}
      return means['loss'], means

    return jax.grad(loss_fn, has_aux=True)(params)

  sharded = jax.shard_map(device_grads, mesh=scheme.mesh,
                          in_specs=(param_specs, scheme.batch_spec, P(), P()),
                          out_specs=(param_specs, P()))

  def grad_fn(params, batch, rng, constants=None):
    return sharded(params, batch, rng, constants)

  return grad_fn


def make_train_step(model: models.AlexNet, tx, scheme: parallel.Scheme,
                    state_shardings, lr_multipliers=None):
  """Returns `train_step(state, batch, lr, rng, constants=None) -> (state,
  metrics)`, jitted; the batch and constants are `make_grad_fn`'s.

  `metrics` holds the global batch's mean loss, top-1 and top-5.
  """
  param_specs = jax.tree.map(lambda s: s.spec, state_shardings['params'])
  grads_fn = make_grad_fn(model, scheme, param_specs)

  def train_step(state, batch, lr, rng, constants=None):
    params = state['params']
    grads, metrics = grads_fn(params, batch, rng, constants)
    opt_state = state['opt_state']
    opt_state.hyperparams['learning_rate'] = lr
    updates, opt_state = tx.update(grads, opt_state, params)
    if lr_multipliers is not None:
      updates = jax.tree.map(lambda u, m: u * m, updates, lr_multipliers)
    params = optax.apply_updates(params, updates)
    return {'step': state['step'] + 1, 'params': params,
            'opt_state': opt_state}, metrics

  return jax.jit(train_step, donate_argnums=0,
                 out_shardings=(state_shardings, None))


def make_eval_step(model: models.AlexNet, scheme: parallel.Scheme,
                   param_shardings):
  """Returns `eval_step(params, batch, constants=None) -> sums` (loss, top1,
  top5, count); the constants cut the centre patch or the ten patches of an
  evaluation batch's images (`device_augment.eval_inputs`)."""
  local_model = scheme.local_model(model)
  param_specs = jax.tree.map(lambda s: s.spec, param_shardings)

  def device_sums(params, batch, constants):
    images = device_augment.eval_inputs(batch, constants)
    if images.ndim == 5:
      # [B, 10, H, W, 3]: the ten patches of section 4.1. The prediction is
      # the softmax averaged over them; as logits, log p gives the averaged
      # prediction's cross-entropy and top-k (log_softmax(log p) = log p),
      # and the floor keeps it finite for a class every patch rules out.
      examples, patches = images.shape[:2]
      logits = local_model.apply(
          {'params': params},
          images.reshape(examples * patches, *images.shape[2:]), train=False)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      probs = probs.reshape(examples, patches, -1).mean(axis=1)
      logits = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
    else:
      logits = local_model.apply({'params': params}, images, train=False)
    return jax.lax.psum(_metrics(logits, batch['label'], batch['mask']),
                        scheme.batch_axes)

  sharded = jax.shard_map(device_sums, mesh=scheme.mesh,
                          in_specs=(param_specs, scheme.batch_spec, P()),
                          out_specs=P())

  def eval_step(params, batch, constants=None):
    return sharded(params, batch, constants)

  return jax.jit(eval_step)


def process_rows(scheme: parallel.Scheme, batch_size: int) -> tuple[int, int]:
  """The rows of a global batch that this process's devices hold.

  Read from the batch sharding, so it is right for any mesh: under
  'two_column' two processes holding the two columns of one data-parallel
  replica both need the same rows.
  """
  sharding = scheme.sharding(scheme.batch_spec)
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None
                   else s[0].stop) for s in index_map.values()})
  first, last = spans[0][0], spans[-1][1]
  covered = sum(stop - start for start, stop in spans)
  if covered != last - first:
    raise ValueError(f'This process holds non-contiguous rows {spans} of the '
                     f'batch on mesh {dict(scheme.mesh.shape)}')
  return first, last


def global_batch(scheme: parallel.Scheme, local: data.Batch,
                 batch_size: int | None = None):
  """Assembles the global batch from every process's local part."""
  sharding = scheme.sharding(scheme.batch_spec)
  shape = lambda v: None if batch_size is None else (batch_size, *v.shape[1:])
  return {k: jax.make_array_from_process_local_data(sharding, v, shape(v))
          for k, v in local.items()}


def device_constants(scheme: parallel.Scheme, dataset: data.Dataset):
  """The dataset's `device_augment.Constants`, replicated over the mesh."""
  return device_augment.put(dataset.preprocessing, scheme.sharding(P()))


def prefetch_to_mesh(batches: Iterator, to_mesh: Callable, depth: int = 2
                     ) -> Iterator:
  """`to_mesh(batch)` of each host batch, issued `depth` batches ahead.

  The transfers are asynchronous: a batch's is under way while the steps
  before it run, and the loop only ever waits for the host to make a batch.
  """
  queue = collections.deque()
  try:
    for batch in batches:
      queue.append(to_mesh(batch))
      if len(queue) > depth:
        yield queue.popleft()
    while queue:
      yield queue.popleft()
  finally:
    # The host pipeline's workers stop as soon as the loop lets go.
    close = getattr(batches, 'close', None)
    if close is not None:
      close()


def evaluate(eval_step, params, dataset: data.Dataset, scheme, config,
             constants=None) -> dict:
  """Validation loss, top-1 and top-5 of `params` over the whole split;
  `constants`: the dataset's on the mesh (by default put there now)."""
  if constants is None:
    constants = device_constants(scheme, dataset)
  totals = None
  rows = process_rows(scheme, config.eval_batch_size)
  to_mesh = lambda b: global_batch(scheme, b, config.eval_batch_size)
  for batch in prefetch_to_mesh(
      dataset.eval_batches(batch_size=config.eval_batch_size, rows=rows),
      to_mesh):
    sums = eval_step(params, batch, constants)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {k: float(totals[k]) / count for k in ('loss', 'top1', 'top5')}


class _Preemption:
  """Turns SIGTERM into the step after which the loop saves and stops.

  One process: a Python handler sets a flag. Several: all must stop after the
  same step, or the first to save waits in the checkpoint's barrier for the
  others while they wait for it in the next step's collectives (a hang). JAX's
  coordination service catches SIGTERM on every process and agrees on that
  step, so no Python handler may replace its own.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if self._multi_process:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook kernels)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint, then exiting.')
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it after every step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the final validation metrics: {'step', 'epoch', 'loss', 'top1',
  'top5'} (top-k as fractions), plus 'preempted': True if SIGTERM stopped it.
  """
  # Every check that needs no workdir comes first: a config that cannot
  # work leaves nothing behind.
  validation.check_config(config)
  devices = select_devices(config)
  scheme = parallel.make_scheme(config.parallelism, devices,
                                tuple(config.mesh_shape))
  validation.check_layout(config, scheme, jax.process_count())
  dataset = data.get_dataset(config, validation.image_size(config))
  validation.check_dataset(config, dataset)
  # SIGTERM from here on stops the run after its first step at the latest,
  # with a checkpoint: a preemption during start-up (compiling, restoring,
  # the input pipeline's start) is a preemption like any other. The run then
  # owns the workdir before it reads anything there.
  # float64 needs JAX's 64-bit mode; scoped to this run, so a notebook or a
  # test that trains in float32 afterwards is unaffected.
  with _Preemption() as preemption, workdir_lib.owned(workdir), \
      jax.enable_x64(config.model.dtype == 'float64'):
    runs.check_resumable(config, workdir)
    return _train_and_evaluate(config, workdir, scheme, dataset, preemption)


def _train_and_evaluate(config, workdir: str, scheme: parallel.Scheme,
                        dataset: data.Dataset,
                        preemption: _Preemption) -> dict:
  image_size = validation.image_size(config)

  model = models.from_config(config)
  tx = optim.make_optimizer(config)
  steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else steps_per_epoch)
  logging.info('%s on mesh %s (%s devices), %d steps of %d, %d per epoch',
               scheme.name, dict(scheme.mesh.shape),
               scheme.mesh.devices.flat[0].platform,
               total_steps, config.batch_size, steps_per_epoch)

  state, shardings = create_train_state(model, tx, scheme, image_size,
                                        config.seed)
  logging.info('%s parameters', f"{models.count_params(state['params']):,}")
  schedule = optim.init_schedule_state(config)
  ckpt = checkpointing.Checkpointer(
      workdir, max_to_keep=config.max_checkpoints_to_keep)
  meta = {'eval': None}
  latest = None
  found = ckpt.restore_latest_good(checkpointing.abstract(state, shardings),
                                   schedule)
  if found is not None:
    latest, (state, schedule, meta) = found
    logging.info('Resuming at step %d', latest)
  elif config.get('init_from') is not None:
    try:
      state['params'], fresh = runs.start_from(
          config.init_from, config, state['params'], shardings['params'])
    except BaseException:
      ckpt.close()
      raise
    logging.info('Starting from the parameters of %s%s', config.init_from,
                 f' except {", ".join(fresh)} (initialised afresh)'
                 if fresh else '')
  start_step = int(jax.device_get(state['step']))
  writer = metrics_io.MetricWriter(workdir, resume_step=start_step)
  if jax.process_index() == 0:
    # The run's config, for `evaluate`, `predict`, fine-tuning and the record.
    runs.write_config(workdir, config)

  lr_multipliers = optim.step_lr_multipliers(config, state['params'])
  train_step = make_train_step(model, tx, scheme, shardings, lr_multipliers)
  eval_step = make_eval_step(model, scheme, shardings['params'])
  constants = device_constants(scheme, dataset)
  base_rng = jax.random.key(config.seed + 1)
  logging.info('Starting the input pipeline at step %d', start_step + 1)

  def to_mesh(local):
    # How many records were passed over stays on the host; the rest goes.
    skipped = int(np.sum(local.pop('skipped', 0)))
    return skipped, global_batch(scheme, local, config.batch_size)

  batches = prefetch_to_mesh(dataset.train_batches(
      batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      rows=process_rows(scheme, config.batch_size)), to_mesh)

  # Per-step metrics since the last log line. A checkpoint carries them, so
  # that a resumed run logs the same averages as an uninterrupted one.
  pending: list[tuple[int, dict]] = [
      (s, m) for s, m in meta.get('pending', []) if s <= start_step]
  # Training examples whose record could not be used, so far in the run.
  # Each process counts its own rows; the checkpoint holds the total, carried
  # on by process 0.
  skipped_images = (meta.get('skipped_images', 0)
                    if jax.process_index() == 0 else 0)

  def total_skipped() -> int:
    if jax.process_count() == 1:
      return skipped_images
    return int(np.sum(multihost_utils.process_allgather(
        np.int64(skipped_images))))
  last_good = latest

  def check_finite():
    """Fetches the pending metrics; stops the run at the first bad step."""
    fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()})
               for s, m in pending]
    pending[:] = fetched
    for s, m in fetched:
      if not math.isfinite(float(m['loss'])):
        writer.write({'step': s, 'epoch': s / steps_per_epoch,
                      'split': 'train', 'loss': float(m['loss']),
                      'top1': float('nan'), 'top5': float('nan'),
                      'lr': float('nan')})
        # The last good checkpoint may still be being written in the
        # background: it must be complete before the error ends the process.
        ckpt.wait()
        where = (f'the last good checkpoint is step {last_good} in '
                 f'{ckpt.directory}' if last_good is not None
                 else 'no checkpoint was written')
        raise NonFiniteLossError(
            f'Non-finite training loss ({float(m["loss"])}) at step {s} '
            f'(epoch {s / steps_per_epoch:.2f}); {where}. Lower '
            '--config.optimizer.learning_rate or check the input data.')
    return fetched

  def save(step):
    nonlocal last_good
    meta['pending'] = check_finite()
    meta['step'] = step
    meta['skipped_images'] = total_skipped()
    ckpt.save(step, state, schedule, meta)
    last_good = step

  lr = optim.learning_rate(config, start_step, steps_per_epoch, schedule)
  window_start, window_step = time.time(), start_step
  preempted = False
  try:
    for step in range(start_step + 1, total_steps + 1):
      skipped, batch = next(batches)
      skipped_images += skipped
      if step == start_step + 1:
        logging.info('Compiling the train step (the first step takes '
                     'longer)')
      state, metrics = train_step(state, batch, lr,
                                  jax.random.fold_in(base_rng, step),
                                  constants)
      pending.append((step, metrics))

      if step % config.log_every_steps == 0 or step == total_steps:
        fetched = check_finite()
        pending.clear()
        elapsed = time.time() - window_start
        steps_per_sec = (step - window_step) / max(elapsed, 1e-9)
        window_start, window_step = time.time(), step
        means = {k: float(np.mean([m[k] for _, m in fetched]))
                 for k in ('loss', 'top1', 'top5')}
        images_per_sec = steps_per_sec * config.batch_size
        writer.write({'step': step, 'epoch': step / steps_per_epoch,
                      'split': 'train', **means, 'lr': lr,
                      'images_per_sec': images_per_sec,
                      'skipped_images': total_skipped()})
        logging.info(
            'step %d/%d  epoch %.2f  loss %.4f  top1 %.2f%%  top5 %.2f%%  '
            'lr %.2g  %.0f img/s  ETA %s', step, total_steps,
            step / steps_per_epoch, means['loss'], 100 * means['top1'],
            100 * means['top5'], lr, images_per_sec,
            metrics_io.format_duration((total_steps - step) / steps_per_sec))

      evaluated = step % eval_every == 0 or step == total_steps
      if evaluated:
        check_finite()
        result = evaluate(eval_step, state['params'], dataset, scheme, config,
                          constants)
        schedule = optim.update_schedule_state(config, schedule,
                                               1.0 - result['top1'])
        meta['eval'] = {'step': step, 'epoch': step / steps_per_epoch,
                        **result}
        writer.write({'step': step, 'epoch': step / steps_per_epoch,
                      'split': 'eval', **result, 'lr': lr})
        logging.info('eval at step %d: loss %.4f  top1 %.2f%%  top5 %.2f%%',
                     step, result['loss'], 100 * result['top1'],
                     100 * result['top5'])
        _warn_if_flat(result['loss'], config.model.num_classes, step,
                      config.model.init_scheme)
      lr = optim.learning_rate(config, step, steps_per_epoch, schedule)
      preempted = preemption.reached(step)
      # The one place that decides whether a step is saved, so none is saved
      # twice: after an evaluation (it carries the schedule's new state), at
      # the interval, at the end (which evaluates) and when preempted.
      if evaluated or preempted or step % config.checkpoint_every_steps == 0:
        save(step)
      if preempted:
        logging.warning('Preempted at step %d; run the same command to '
                        'resume.', step)
        break
  finally:
    # Whatever stopped the loop, a checkpoint being written in the background
    # is completed before the process can exit.
    ckpt.wait()
    ckpt.close()
    writer.close()
  if start_step >= total_steps:
    logging.info('Already trained for %d steps; nothing to do.', total_steps)
  final = dict(meta['eval'] or {})
  if preempted:
    final['preempted'] = True
  return final


def _warn_if_flat(loss: float, num_classes: int, step: int, init_scheme: str):
  # A loss stuck at ln(C) means the network predicts uniformly: with the
  # paper's initialisation (biases of 1) small networks stay there for many
  # epochs (Caffe saw the same and used 0.1). Say so instead of looking hung.
  if abs(loss - math.log(num_classes)) < 0.01 * math.log(num_classes):
    logging.warning(
        'Validation loss %.4f at step %d is ln(%d): the network still predicts '
        'uniformly.%s', loss, step, num_classes,
        " The paper's initialisation is known to stay flat for a long time on "
        'scaled-down networks; --config.model.init_scheme=he avoids it.'
        if init_scheme == 'paper' else '')
