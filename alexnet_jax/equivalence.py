"""Trains one config under several schemes and compares their loss curves.

    python -m alexnet_jax.equivalence --config=configs/two_gpu.py:digits \\
        --steps=100 --config.model.dtype=float64

Every scheme starts from the same parameters and sees the same batches, with
dropout off; the per-step training losses are compared with the
single-device run. In float64 they agree to about 1e-14. In float32 they agree
for the first steps and then drift apart: the schemes sum in different orders,
and SGD on a small, noisy problem amplifies those round-off differences
(a max-pooling window whose two largest inputs differ by one rounding step
sends the gradient to either one). That drift says nothing about the schemes.
"""

from __future__ import annotations

import math
import tempfile

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import runtime

FLAGS = flags.FLAGS


def compare(config, schemes, steps: int) -> dict[str, list[float]]:
  """Per-step training losses of each scheme (trained in a scratch workdir)."""
  from alexnet_jax import metrics_io, train
  losses = {}
  for scheme in schemes:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.parallelism = scheme
      c.model.dropout_rate = 0.0
      c.num_train_steps = steps
      c.log_every_steps = 1
      c.eval_every_steps = steps
      c.checkpoint_every_steps = steps
      c.optimizer.batch_scaling = 'none'
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(c, workdir)
      losses[scheme] = [r['loss'] for r in metrics_io.read_metrics(workdir)
                        if r['split'] == 'train']
  return losses


def summarise(losses: dict[str, list[float]], reference: str = 'none'):
  """Rows of (scheme, max relative difference, first step off in 4 digits)."""
  ref = losses[reference]
  rows = []
  for scheme, curve in losses.items():
    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(curve, ref)]
    off = next((i + 1 for i, (a, b) in enumerate(zip(curve, ref))
                if f'{a:.4g}' != f'{b:.4g}'), None)
    rows.append((scheme, max(rel), off))
  return rows


def main(argv):
  del argv
  config = FLAGS.config
  schemes = FLAGS.schemes
  if 'none' not in schemes:
    schemes = ['none', *schemes]
  runtime.setup(config, num_cpu_devices=max(runtime.cpu_devices_needed(config),
                                            2))
  losses = compare(config, schemes, FLAGS.steps)
  print(f'{FLAGS.steps} steps, {config.model.dtype}, dropout off; training '
        'loss against parallelism=none')
  print(f"{'scheme':<14}{'first loss':>12}{'last loss':>12}"
        f"{'max rel diff':>14}  same to 4 significant digits")
  for scheme, worst, off in summarise(losses):
    curve = losses[scheme]
    same = 'all steps' if off is None else f'until step {off - 1}'
    print(f'{scheme:<14}{curve[0]:>12.6g}{curve[-1]:>12.6g}{worst:>14.2e}  '
          f'{same}')
  if any(not math.isfinite(x) for c in losses.values() for x in c):
    raise SystemExit('a loss was not finite')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 100, 'Training steps per scheme.')
  flags.DEFINE_list('schemes', ['data', 'two_column', 'weird_trick'],
                    'Schemes to compare with parallelism=none.')
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=runtime.parse_flags)
