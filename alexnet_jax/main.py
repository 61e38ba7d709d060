"""Command line: `python -m alexnet_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Fields are overridden with --config.FIELD=VALUE (type-checked). Running the
same command again resumes from the latest checkpoint in DIR.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import metrics_io, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and '
                    'TensorBoard events go here; a run resumes from it.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, '
                                'optionally with :ARG (digits, synthetic).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics_io.quiet_library_logs()
  config = FLAGS.config
  runtime.setup(config)  # CPU devices and jax.distributed, before JAX starts
  import jax
  from alexnet_jax import checkpointing, train, validation, workdir
  logging.info('JAX process %d of %d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    final = train.train_and_evaluate(config, FLAGS.workdir)
  except (validation.ConfigError, train.NonFiniteLossError,
          checkpointing.CheckpointError, workdir.WorkdirBusyError,
          OSError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except BaseException:
    if jax.process_count() > 1:
      # The other processes wait in a collective for this one, and
      # jax.distributed's shutdown would wait minutes for them: exit now so
      # the launcher (srun, local.sh, Kubernetes) sees the failure at once.
      traceback.print_exc()
      sys.stderr.flush()
      os._exit(1)
    raise
  if final.get('preempted'):
    print('preempted: checkpoint saved; run the same command to resume')
  elif final.get('step') is not None:
    print('final: step {step}  epoch {epoch:.2f}  loss {loss:.4f}  '
          'top1 {top1:.2%}  top5 {top5:.2%}'.format(**final))


if __name__ == '__main__':
  app.run(main, flags_parser=runtime.parse_flags)
