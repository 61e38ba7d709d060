"""Orbax checkpoints in `workdir/checkpoints`.

A checkpoint holds the train state (step, parameters, optimizer state), the
learning-rate schedule's state and a small JSON record. The step number is all
the data order and the dropout keys depend on, so restoring these three resumes
a run exactly. Parameters are stored as global arrays: a checkpoint written
under one scheme and device count restores onto any other mesh, because the
restore target carries the new shardings.
"""

from __future__ import annotations

import os
import shutil

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be restored, or one cannot be written."""


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int | None = None,
               read_only: bool = False):
    """`read_only`: for readers of a run (evaluate, predict, fine-tuning),
    which may look at a workdir while its run is still training there; they
    never save. (orbax's own read_only option warns on every use.)"""
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep,
              # A save killed half-way leaves a temporary folder: removed at
              # the next start of the run that owns the workdir (never by a
              # reader, which would remove a live run's save in progress),
              # it can never be mistaken for a checkpoint.
              cleanup_tmp_directories=not read_only, create=not read_only,
              # A step directory that cannot be made then fails the save
              # call itself. Made in the background, its failure leaves
              # orbax's writer threads waiting 300 s for it at exit.
              async_options=ocp.AsyncOptions(
                  create_directories_asynchronously=False)))
    except OSError as e:
      raise CheckpointError(
          f'Cannot keep checkpoints in {self.directory}: {e}') from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def stored_params(self, step: int):
    """The parameter tree of checkpoint `step` as orbax's metadata (shape and
    dtype of every array), read without reading the arrays."""
    reader = ocp.StandardCheckpointer()
    try:
      metadata = reader.metadata(os.path.join(self.directory, str(step),
                                              'state'))
    finally:
      reader.close()
    return metadata.item_metadata['params']

  def save(self, step: int, state, schedule, meta: dict) -> None:
    """Saves `step`; the caller decides which steps are saved."""
    # The schedule's state is the same on every process and lives on the
    # host: as NumPy process 0 writes it, whereas orbax refuses host-local
    # jax.Arrays under jax.distributed.
    schedule = jax.tree.map(np.asarray, schedule)
    try:
      # Forced past orbax's own interval and preemption policy: the training
      # loop's one decision is the only one.
      self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  schedule=ocp.args.StandardSave(schedule),
                                  meta=ocp.args.JsonSave(meta)),
          force=True)
    except Exception as e:  # this save, or the previous one's background part
      raise self._write_error(e) from e

  def _write_error(self, e: Exception) -> CheckpointError:
    return CheckpointError(
        f'Writing a checkpoint in {self.directory} failed: '
        f'{type(e).__name__}: {e}. The checkpoints written before are '
        'untouched: free some space (or fix the permissions) there and run '
        'the same command to resume from the latest one.')

  def restore(self, step: int, abstract_state, schedule_like):
    """Restores the state onto the shardings that `abstract_state` carries and
    the schedule as NumPy arrays shaped like `schedule_like`."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            schedule=ocp.args.StandardRestore(
                jax.tree.map(np.asarray, schedule_like)),
            meta=ocp.args.JsonRestore()))
    logging.info('Restored step %d from %s', step, self.directory)
    return restored['state'], restored['schedule'], restored['meta']

  def restore_latest_good(self, abstract_state, schedule_like):
    """Restores the newest checkpoint that reads back whole.

    A checkpoint that fails to restore (a truncated or corrupt file) is passed
    over with a warning naming it and the step used instead. Returns None when
    there is no checkpoint at all; raises when there are some and none reads,
    rather than starting over from step 0 and overwriting them.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        restored = self.restore(step, abstract_state, schedule_like)
      except Exception as e:  # orbax, tensorstore and JSON errors alike
        failures.append((step, f'{type(e).__name__}: {e}'))
        logging.warning('Checkpoint %d in %s cannot be restored (%s).', step,
                        self.directory, failures[-1][1][:300])
        continue
      if failures:
        self._set_aside([s for s, _ in failures])
        logging.warning(
            'Resuming from step %d instead of the unreadable checkpoint(s) %s '
            '(moved to %s).', step, ', '.join(str(s) for s, _ in failures),
            self.unreadable_directory)
      return step, restored
    if failures:
      raise CheckpointError(
          f'None of the checkpoints {steps} in {self.directory} can be '
          f'restored; the newest failed with: {failures[0][1][:500]}. Move '
          'them away to start over, or fix the config if it changed since '
          'they were written.')
    return None

  @property
  def unreadable_directory(self) -> str:
    return self.directory + '_unreadable'

  def _set_aside(self, steps):
    # Kept for inspection, out of orbax's way: left in place, a newer
    # unreadable step would make the manager skip every save up to it.
    if jax.process_index() == 0:
      os.makedirs(self.unreadable_directory, exist_ok=True)
      for step in steps:
        shutil.move(os.path.join(self.directory, str(step)),
                    os.path.join(self.unreadable_directory, str(step)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoints set aside')
    self.manager.reload()

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # a background write failed
      raise self._write_error(e) from e

  def close(self):
    self.manager.close()


def abstract(tree, shardings):
  """ShapeDtypeStructs that tell orbax the shape, dtype and target sharding."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
