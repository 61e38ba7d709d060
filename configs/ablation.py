"""The paper's ablations: the 2012 network of configs/two_gpu.py with exactly
one thing changed (Krizhevsky et al. 2012, sections 3.1-3.5).

    python -m alexnet_jax.main --config=configs/ablation.py:NAME --workdir=/tmp/NAME

trains NAME on ImageNet (90 epochs, batch 128), and

    python -m alexnet_jax.main --config=configs/ablation.py:NAME,digits --workdir=/tmp/NAME

its quarter-width copy on the embedded digits. NAME is one member of a pair:

    relu / tanh                 the non-linearity; the paper: ReLU reached 25%
                                training error on CIFAR-10 six times faster
                                (in epochs) than tanh (Figure 1)
    lrn / no_lrn                local response normalisation after conv1 and
                                conv2; the paper: -1.4 / -1.2 points of top-1
                                / top-5 error on ImageNet with it
    overlapping_pool /          3x3 windows with stride 2, or 2x2 windows with
      non_overlapping_pool      stride 2; the paper: -0.4 / -0.3 with 3x3
    two_columns / one_column    two columns on two devices, or the single
                                column with half the kernels of conv1-4 on one
                                device (section 3.5, footnote 2); the paper:
                                -1.7 / -1.2 with two columns

relu, lrn, overlapping_pool and two_columns are configs/two_gpu.py itself.
Every digits config logs training metrics every 2 steps (23 steps make an
epoch), so that the epoch at which training error first reaches 25% is known
to a tenth of an epoch; the ImageNet configs log every 50 of 10,009. Both
poolings and both variants keep every feature map non-empty at 99 pixels
(conv1 23, pool1 11, pool2 5, pool5 2), so the digits image size is unchanged.

    python -m alexnet_jax.ablations --dataset=digits --workdir=/tmp/ablations --seeds=3 --out=docs/ablations.md

runs every pair with 3 seeds (32 minutes on 2 shared CPU cores) and writes
the table of docs/ablations.md.
"""

import ml_collections

from configs import two_gpu

PAIRS = {
    'relu_tanh': ('relu', 'tanh'),
    'lrn': ('lrn', 'no_lrn'),
    'pooling': ('overlapping_pool', 'non_overlapping_pool'),
    'columns': ('two_columns', 'one_column'),
}
NAMES = tuple(name for pair in PAIRS.values() for name in pair)


def _one_column(c):
  # One column cannot be split over two devices: one device, as in the paper.
  c.model.variant = 'one_column'
  c.parallelism = 'none'
  c.num_devices = 1
  c.cpu_devices = 1


CHANGES = {
    'relu': lambda c: None,
    'tanh': lambda c: setattr(c.model, 'activation', 'tanh'),
    'lrn': lambda c: None,
    'no_lrn': lambda c: setattr(c.model, 'lrn', 'off'),
    'overlapping_pool': lambda c: None,
    'non_overlapping_pool': lambda c: setattr(c.model, 'pool_window', 2),
    'two_columns': lambda c: None,
    'one_column': _one_column,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is 'NAME' (ImageNet) or 'NAME,digits' / 'NAME,synthetic'."""
  name, _, variant = (arg or '').partition(',')
  if name not in CHANGES:
    raise ValueError(f'Unknown ablation {name!r}: use one of '
                     f'{", ".join(NAMES)}, optionally followed by ,digits or '
                     ',synthetic (e.g. configs/ablation.py:tanh,digits).')
  c = two_gpu.get_config(variant or None)
  if variant == 'digits':
    c.log_every_steps = 2
  CHANGES[name](c)
  return c

