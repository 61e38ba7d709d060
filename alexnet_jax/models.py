"""AlexNet in Flax Linen: the 2012 two-column network and the 2014 single column.

One module serves every parallel scheme. With its partition fields left at their
defaults it is the whole network on one device (the columns become grouped
convolutions, LRN is applied per column). Inside `jax.shard_map` the same module,
given the mesh axis names and the shard counts, builds only this device's share of
every layer and says with explicit collectives where activations cross devices
(`alexnet_jax.parallel` supplies those fields). The parameter tree of the
single-device model is the global tree of every scheme: a device's parameters are
slices of it along the output-feature axis.

Mixed precision (`dtype=bfloat16`): parameters, and so the optimizer's state
and update, stay float32; convolutions, matmuls, ReLUs and pooling compute in
bfloat16. In float32: the LRN sum of squares (`lrn`), the logits, and so the
softmax and loss, and the cross-device gradient sums (the train step casts the
float32 parameters, not their bfloat16 copies, to per-device values).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The layer table of one variant (ALEXNET.md section 1)."""

  image_size: int
  conv_features: tuple[int, int, int, int, int]
  conv1_padding: int
  # Number of columns: 2 in the 2012 network, whose conv2, conv4 and conv5 see
  # only their own column's maps and whose LRN never crosses the column boundary.
  columns: int
  fc_features: int
  lrn_default: bool
  # 'after': dropout on the outputs of fc6 and fc7 (paper, section 4.2);
  # 'before': on the inputs of fc6 and fc7 (torchvision's layout).
  dropout_position: str


ARCHITECTURES = {
    'original': Architecture(
        image_size=227, conv_features=(96, 256, 384, 384, 256), conv1_padding=0,
        columns=2, fc_features=4096, lrn_default=True, dropout_position='after'),
    'owt': Architecture(
        image_size=224, conv_features=(64, 192, 384, 256, 256), conv1_padding=2,
        columns=1, fc_features=4096, lrn_default=False,
        dropout_position='before'),
    # The paper's single-column comparison (section 3.5, footnote 2): one
    # column with half the kernels of the two-column network in conv1-conv4,
    # but conv5 and the FC layers kept whole, so it has about as many
    # parameters (the comparison favours it).
    'one_column': Architecture(
        image_size=227, conv_features=(48, 128, 192, 192, 256),
        conv1_padding=0, columns=1, fc_features=4096, lrn_default=True,
        dropout_position='after'),
}

# The non-linearity: the paper's ReLU, or the saturating tanh it is compared
# with in Figure 1.
ACTIVATIONS = {'relu': nn.relu, 'tanh': jnp.tanh}

# Layers whose bias starts at 1 in the paper (section 5): it gives the ReLUs
# positive inputs early in training.
PAPER_BIAS_ONE = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')
CONV_LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')
FC_LAYERS = ('fc6', 'fc7', 'fc8')

# How some operations are computed, chosen per platform: each choice is the
# same function with the same parameters (tests/test_lowerings.py), and
# docs/benchmarks.md has the measurements behind the defaults. Field: (its
# choices, what 'auto' means on the CPU, and on accelerators).
#   conv1: 'direct', an 11x11 stride-4 convolution over 3 channels, which
#     fills a GPU's matrix units poorly; 'space_to_depth', a 3x3 stride-1
#     convolution over 4x4 blocks of pixels folded into 48 channels; or
#     'tiled', the direct convolution in the pieces XLA's CPU kernels
#     compute fastest (`tiled_conv`).
#   grouped_conv: the column-grouped convolutions (conv2, conv4, conv5 of the
#     two-column network on one device) as one convolution with a feature
#     group count, or 'split' into one per group, concatenated: XLA's CPU
#     backend computes the grouped form's backward pass about ten times
#     slower.
#   pooling: XLA's 'reduce_window', whose gradient is a select-and-scatter,
#     or the maximum of 'strided' slices with its gradient written out
#     (`strided_max_pool`): on the CPU, XLA expands select-and-scatter into
#     index tensors and a scatter.
LOWERINGS = {
    'conv1': (('direct', 'space_to_depth', 'tiled'), 'tiled',
              'space_to_depth'),
    'grouped_conv': (('grouped', 'split'), 'split', 'grouped'),
    'pooling': (('reduce_window', 'strided'), 'strided', 'reduce_window'),
}


def lowering_choices(field: str) -> tuple[str, ...]:
  return ('auto',) + LOWERINGS[field][0]


def lowering(field: str, mode: str, platform: str | None = None) -> str:
  """How `field` ('conv1', 'grouped_conv', 'pooling') is computed: `mode`,
  with 'auto' resolved for `platform` (JAX's default backend if None)."""
  choices, on_cpu, on_accelerators = LOWERINGS[field]
  if mode == 'auto':
    platform = platform or jax.default_backend()
    return on_cpu if platform == 'cpu' else on_accelerators
  if mode not in choices:
    raise ValueError(f'model.{field} must be one of '
                     f'{lowering_choices(field)}, got {mode!r}')
  return mode

def lrn(x: jax.Array, *, n: int = 5, k: float = 2.0, alpha: float = 1e-4,
        beta: float = 0.75) -> jax.Array:
  """Local response normalisation across channels (paper, section 3.3).

  b_i = a_i / (k + alpha * sum_{j=max(0, i-n//2)}^{min(N-1, i+n//2)} a_j^2)^beta

  over the last (channel) axis of `x`: `alpha` multiplies the plain sum of
  squares, and the window is clipped at the first and last channel (zero
  padding adds nothing to the sum). The sum is taken in at least float32,
  because squares of activations lose precision in bfloat16; the result has
  the input's dtype.

  Other conventions, written with this function:
    Caffe `LRN(local_size, alpha, beta, k)`: lrn(x, n=local_size,
      alpha=alpha / local_size, beta=beta, k=k); the paper's layer is Caffe's
      local_size=5, alpha=5e-4, beta=0.75, k=2 (Caffe's default k is 1).
    PyTorch `nn.LocalResponseNorm(size, alpha, beta, k)`: the same as Caffe,
      lrn(x, n=size, alpha=alpha / size, beta=beta, k=k).
    cuda-convnet2 `[rnorm] size, scale, pow, minDiv`: lrn(x, n=size,
      alpha=scale / size, beta=pow, k=minDiv).
    TensorFlow `local_response_normalization(depth_radius, bias, alpha,
      beta)`: lrn(x, n=2 * depth_radius + 1, k=bias, alpha=alpha, beta=beta).
  """
  if n < 1 or n % 2 == 0:
    raise ValueError(f'lrn: n must be a positive odd window size, got n={n}')
  wide = jnp.promote_types(x.dtype, jnp.float32)
  squares = jnp.square(x.astype(wide))
  window = (1,) * (x.ndim - 1) + (n,)
  padding = ((0, 0),) * (x.ndim - 1) + ((n // 2, n // 2),)
  # A Python scalar init value keeps this a sum that reverse-mode autodiff knows.
  sums = lax.reduce_window(squares, 0.0, lax.add, window, (1,) * x.ndim, padding)
  return (x.astype(wide) * (k + alpha * sums) ** -beta).astype(x.dtype)


def grouped_lrn(x: jax.Array, groups: int, **lrn_kwargs) -> jax.Array:
  """LRN applied to each group of channels separately (one group per column)."""
  if groups == 1:
    return lrn(x, **lrn_kwargs)
  grouped = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  return lrn(grouped, **lrn_kwargs).reshape(x.shape)


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/block, W/block, block * block * C]: each block of
  pixels becomes one pixel with channels ordered (row, column, channel)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // block, w // block, block * block * c)


def fold_kernel(kernel: jax.Array, block: int) -> jax.Array:
  """A [k, k, C, F] kernel of stride `block` as the [ceil(k/block)] ** 2
  kernel over `space_to_depth(x, block)` that computes the same outputs: the
  kernel is zero-padded to a multiple of the block and folded like the input."""
  k, _, c, f = kernel.shape
  taps = -(-k // block)
  kernel = jnp.pad(kernel, ((0, taps * block - k), (0, taps * block - k),
                            (0, 0), (0, 0)))
  kernel = kernel.reshape(taps, block, taps, block, c, f)
  kernel = kernel.transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(taps, taps, block * block * c, f)


def _conv_parameters(module: nn.Module, x: jax.Array, groups: int = 1):
  """The kernel and bias of a square convolution module (fields features,
  kernel_size, dtype, param_dtype, kernel_init, bias_init) declared as
  `nn.Conv` declares them, so the tree and the initial values are its; and
  x, kernel and bias in the compute dtype."""
  k = module.kernel_size
  kernel = module.param('kernel', module.kernel_init,
                        (k, k, x.shape[-1] // groups, module.features),
                        module.param_dtype)
  bias = module.param('bias', module.bias_init, (module.features,),
                      module.param_dtype)
  return nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)


def _direct_conv(x: jax.Array, kernel: jax.Array, stride: int,
                 padding: int) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# On the CPU measured (docs/benchmarks.md), XLA's convolution kernels
# (XNNPACK) compute conv1 on a batch of more than TILE_BATCH_PIXELS input
# pixels several times faster in smaller pieces: the forward pass at most
# TILE_KERNELS kernels at a time, unless they come in multiples of 64, which
# it handles whole; the weight gradient a few images at a time, about
# TILE_PIXELS, in at most TILE_SLICES slices (so that a large batch's
# program stays small). A smaller batch is as fast whole.
TILE_KERNELS = 16
TILE_PIXELS = 2 ** 17
TILE_BATCH_PIXELS = 2 ** 19
TILE_SLICES = 8


def tiled_conv(x: jax.Array, kernel: jax.Array, stride: int,
               padding: int) -> jax.Array:
  """`_direct_conv(x, kernel, stride, padding)`, NHWC and HWIO, computed in
  tiles when the batch has more than TILE_BATCH_PIXELS pixels: blocks of
  TILE_KERNELS output features in the forward pass (whole up to
  TILE_KERNELS and in multiples of 64), and the weight gradient summed, in
  float32, over slices of about TILE_PIXELS. A smaller batch takes the
  direct convolution."""
  n, height, width, _ = x.shape
  if n * height * width <= TILE_BATCH_PIXELS:
    return _direct_conv(x, kernel, stride, padding)
  return _tiled_conv(x, kernel, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tiled_conv(x, kernel, stride, padding):
  features = kernel.shape[-1]
  if features <= TILE_KERNELS or features % 64 == 0:
    return _direct_conv(x, kernel, stride, padding)
  return jnp.concatenate([
      _direct_conv(x, kernel[..., i:i + TILE_KERNELS], stride, padding)
      for i in range(0, features, TILE_KERNELS)], axis=-1)


def _tiled_conv_fwd(x, kernel, stride, padding):
  return _tiled_conv(x, kernel, stride, padding), (x, kernel)


def _tiled_conv_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  conv = functools.partial(_direct_conv, stride=stride, padding=padding)
  # The direct convolution's input gradient: conv1 never needs it, and XLA
  # leaves it out.
  dx = jax.vjp(lambda x: conv(x, kernel), x)[1](dy)[0]
  n, height, width = x.shape[:3]
  # The largest power of two of images within TILE_PIXELS, at least one, in
  # at most TILE_SLICES slices.
  rows = min(n, 1 << max((TILE_PIXELS // (height * width)).bit_length() - 1,
                         0))
  rows = max(rows, -(-n // TILE_SLICES))
  dk = sum(jax.vjp(lambda k, i=i: conv(x[i:i + rows], k), kernel)[1](
      dy[i:i + rows])[0].astype(jnp.float32) for i in range(0, n, rows))
  return dx, dk.astype(kernel.dtype)


_tiled_conv.defvjp(_tiled_conv_fwd, _tiled_conv_bwd)


class _SquareConv(nn.Module):
  """The fields of `nn.Conv` for a square kernel, a square stride and
  symmetric padding, which the lowerings below share; `_conv_parameters`
  declares its parameters."""

  features: int
  kernel_size: int
  stride: int
  padding: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros


class TiledConv(_SquareConv):
  """`nn.Conv`, parameters and all, computed by `tiled_conv`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = _conv_parameters(self, x)
    return tiled_conv(x, kernel, self.stride, self.padding) + bias


class SpaceToDepthConv(_SquareConv):
  """A square convolution with stride > 1 (conv1) computed stride 1.

  The input is padded so that each output's receptive field covers whole
  blocks of `stride` x `stride` pixels, the blocks are folded into channels
  and the kernel is folded the same way (`fold_kernel`), so a VALID stride-1
  convolution gives exactly the outputs of the strided one, for any input
  size. The parameters are `nn.Conv`'s, stored unfolded (kernel
  [k, k, C, F], bias [F]) and drawn from the same random streams, so the
  parameter tree, checkpoints and converted weights are those of the direct
  convolution.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.stride, self.padding
    x, kernel, bias = _conv_parameters(self, x)
    taps = -(-k // s)
    out = [(n + 2 * p - k) // s + 1 for n in x.shape[1:3]]
    # Output o reads padded pixels s*o .. s*o + k - 1, inside blocks
    # o .. o + taps - 1; the last block ends at s * (out + taps - 1). Pixels
    # beyond it (a negative padding) are ones the strided conv skips too.
    pads = [(p, s * (o + taps - 1) - n - p, 0)
            for n, o in zip(x.shape[1:3], out)]
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
    y = lax.conv_general_dilated(
        space_to_depth(x, s), fold_kernel(kernel, s), (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


def _window_slices(x: jax.Array, window: int, stride: int):
  """The window's (row, column) offsets and, for each, the strided slice of
  `x` [B, H, W, C] that holds that element of every pooling window."""
  rows = (x.shape[1] - window) // stride + 1
  cols = (x.shape[2] - window) // stride + 1
  for di in range(window):
    for dj in range(window):
      yield di, dj, x[:, di:di + stride * (rows - 1) + 1:stride,
                      dj:dj + stride * (cols - 1) + 1:stride]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def strided_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """VALID max-pooling of [B, H, W, C] as the maximum of window * window
  strided slices: `nn.max_pool(x, (window,) * 2, (stride,) * 2)`.

  Its gradient goes, as select-and-scatter sends it, to the first maximum of
  each window in row-major order, written as elementwise selects and strided
  pads that XLA fuses, with no index tensors or scatter."""
  return functools.reduce(jnp.maximum, (s for _, _, s in _window_slices(
      x, window, stride)))


def _strided_max_pool_fwd(x, window, stride):
  y = strided_max_pool(x, window, stride)
  return y, (x, y)


def _strided_max_pool_bwd(window, stride, residuals, g):
  x, y = residuals
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros_like(x)
  zero = jnp.zeros((), x.dtype)
  for di, dj, s in _window_slices(x, window, stride):
    first = (s == y) & ~taken
    taken = taken | first
    # The window element (di, dj) of output (r, c) is input
    # (di + stride * r, dj + stride * c): interior padding places it there.
    dx = dx + lax.pad(jnp.where(first, g, zero).astype(x.dtype), zero, [
        (0, 0, 0),
        (di, x.shape[1] - di - stride * (y.shape[1] - 1) - 1, stride - 1),
        (dj, x.shape[2] - dj - stride * (y.shape[2] - 1) - 1, stride - 1),
        (0, 0, 0)])
  return (dx,)


strided_max_pool.defvjp(_strided_max_pool_fwd, _strided_max_pool_bwd)


class SplitGroupConv(_SquareConv):
  """`nn.Conv(feature_group_count=groups)`, parameters and all, computed as
  one ungrouped convolution per group: group g's kernels see only group g's
  input maps, so the kernel's output features split the same way."""

  groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = _conv_parameters(self, x, self.groups)
    y = jnp.concatenate([
        _direct_conv(xg, kg, self.stride, self.padding)
        for xg, kg in zip(jnp.split(x, self.groups, axis=-1),
                          jnp.split(kernel, self.groups, axis=-1))], axis=-1)
    return y + bias


def conv1_module(mode: str, features: int, padding: int,
                 **kwargs) -> nn.Module:
  """conv1 (11x11, stride 4) computed as `mode` ('direct',
  'space_to_depth' or 'tiled'): the same parameters and function in each;
  `kwargs` go to the module (dtype, initializers, name)."""
  if mode == 'direct':
    return nn.Conv(features, (11, 11), strides=(4, 4),
                   padding=((padding, padding), (padding, padding)), **kwargs)
  layers = {'space_to_depth': SpaceToDepthConv, 'tiled': TiledConv}
  return layers[mode](features, 11, 4, padding, **kwargs)


def feature_map_sizes(image_size: int, variant: str, pool_window: int = 3,
                      pool_stride: int = 2) -> dict[str, int]:
  """Spatial size after each stage, to check an input size before compiling."""
  arch = ARCHITECTURES[variant]
  sizes = {}
  s = (image_size + 2 * arch.conv1_padding - 11) // 4 + 1
  sizes['conv1'] = s
  s = (s - pool_window) // pool_stride + 1
  sizes['pool1'] = s
  sizes['conv2'] = s
  s = (s - pool_window) // pool_stride + 1
  sizes['pool2'] = s
  sizes['conv3'] = sizes['conv4'] = sizes['conv5'] = s
  s = (s - pool_window) // pool_stride + 1
  sizes['pool5'] = s
  return sizes


def _initializers(init: str, layer: str):
  if init == 'paper':
    bias = 1.0 if layer in PAPER_BIAS_ONE else 0.0
    return nn.initializers.normal(0.01), nn.initializers.constant(bias)
  if init == 'he':
    return nn.initializers.he_normal(), nn.initializers.zeros
  raise ValueError(f"model.init_scheme must be 'paper' or 'he', got {init!r}")


class AlexNet(nn.Module):
  """AlexNet; `model.apply(variables, images, train=..., rngs=...)` -> logits.

  Attributes:
    variant: 'original' (2012, two columns, 227 input), 'owt' (2014 one
      weird trick single column, torchvision layout, 224 input) or
      'one_column' (the 2012 paper's single-column comparison).
    num_classes: size of fc8.
    dropout_rate: dropout probability at the two dropout sites.
    dtype: compute dtype.
    param_dtype: parameter dtype: float32, or float64 for exact comparisons.
    width: multiplies every conv and FC width (CPU-sized runs use 0.25).
    use_lrn: None keeps the variant's default (on for 'original').
    lrn_n, lrn_k, lrn_alpha, lrn_beta: the paper's LRN constants.
    lrn_across_columns: one LRN window over both columns' maps, as Caffe's
      bvlc_alexnet has it; the paper's columns normalise their own maps.
    pool_window, pool_stride: 3/2 is the paper's overlapping pooling.
    init_scheme: 'paper' (N(0, 0.01), biases 1 in conv2/4/5, fc6/7) or 'he'.
    activation: 'relu' (section 3.1) or 'tanh' (Figure 1's comparison).
    conv1, grouped_conv, pooling: how conv1, the column-grouped
      convolutions and max-pooling are computed (LOWERINGS); the same
      function and parameters whatever the choice.

  Partition fields (set by `alexnet_jax.parallel`; defaults = one device):
    column_axis: mesh axis holding the columns of the 'original' network; each
      device builds `columns / column_shards` of them.
    column_shards: size of `column_axis`.
    fc_axis: mesh axis (or axes) over which FC neurons are split.
    fc_shards: total size of `fc_axis`.
    batch_axis: mesh axis (or axes) over which the conv layers' batch is split
      and gathered at fc6's input (the one weird trick).
  """

  variant: str = 'original'
  num_classes: int = 1000
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  width: float = 1.0
  use_lrn: bool | None = None
  lrn_n: int = 5
  lrn_k: float = 2.0
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_across_columns: bool = False
  pool_window: int = 3
  pool_stride: int = 2
  init_scheme: str = 'paper'
  activation: str = 'relu'
  conv1: str = 'auto'
  grouped_conv: str = 'auto'
  pooling: str = 'auto'
  column_axis: AxisName = None
  column_shards: int = 1
  fc_axis: AxisName = None
  fc_shards: int = 1
  batch_axis: AxisName = None

  @property
  def arch(self) -> Architecture:
    if self.variant not in ARCHITECTURES:
      raise ValueError(f'model.variant must be one of {sorted(ARCHITECTURES)}, '
                       f'got {self.variant!r}')
    return ARCHITECTURES[self.variant]

  def scaled(self, features: int) -> int:
    return max(1, int(round(features * self.width)))

  def fc8_is_sharded(self) -> bool:
    """fc8 is split like fc6/fc7 when its classes divide evenly, else replicated."""
    return self.fc_shards > 1 and self.num_classes % self.fc_shards == 0

  def _conv(self, x, layer, features, kernel, padding, groups=1, stride=1):
    kernel_init, bias_init = _initializers(self.init_scheme, layer)
    if groups > 1 and lowering('grouped_conv', self.grouped_conv) == 'split':
      return SplitGroupConv(features, kernel, stride, padding, groups=groups,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=kernel_init, bias_init=bias_init,
                            name=layer)(x)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)),
                   feature_group_count=groups, dtype=self.dtype,
                   param_dtype=self.param_dtype,
                   kernel_init=kernel_init, bias_init=bias_init, name=layer)(x)

  def _dense(self, x, layer, features):
    kernel_init, bias_init = _initializers(self.init_scheme, layer)
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=kernel_init, bias_init=bias_init,
                    name=layer)(x)

  def _pool(self, x):
    if lowering('pooling', self.pooling) == 'strided':
      return strided_max_pool(x, self.pool_window, self.pool_stride)
    return nn.max_pool(x, (self.pool_window,) * 2, (self.pool_stride,) * 2)

  def _lrn(self, x, columns):
    if self.lrn_across_columns:
      columns = 1
    return grouped_lrn(x, columns, n=self.lrn_n, k=self.lrn_k,
                       alpha=self.lrn_alpha, beta=self.lrn_beta)

  def _dropout(self, x, train):
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)

  def _gather_columns(self, x):
    # Communication point of the two-column model: every column's maps.
    if self.column_axis is None:
      return x
    return lax.all_gather(x, self.column_axis, axis=x.ndim - 1, tiled=True)

  def _gather_neurons(self, x, *, invarying=False):
    # FC layers split over devices: every device needs all neurons of the
    # previous layer. The final gather feeds a loss that every device computes
    # identically, so it must be 'invarying' or the gradients come back
    # multiplied by the axis size.
    if self.fc_axis is None:
      return x
    return lax.all_gather(x, self.fc_axis, axis=x.ndim - 1, tiled=True,
                          to='invarying' if invarying else 'varying')

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    arch = self.arch
    use_lrn = arch.lrn_default if self.use_lrn is None else self.use_lrn
    if arch.columns % self.column_shards:
      raise ValueError(f'{arch.columns} columns cannot be split over '
                       f'{self.column_shards} devices')
    columns = arch.columns // self.column_shards  # columns held on this device
    per_device = lambda f: self.scaled(f) // self.column_shards
    c1, c2, c3, c4, c5 = (per_device(f) for f in arch.conv_features)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation must be one of {sorted(ACTIVATIONS)}'
                       f', got {self.activation!r}')
    act = ACTIVATIONS[self.activation]

    x = images.astype(self.dtype)
    kernel_init, bias_init = _initializers(self.init_scheme, 'conv1')
    x = conv1_module(lowering('conv1', self.conv1), c1, arch.conv1_padding,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=kernel_init, bias_init=bias_init,
                     name='conv1')(x)
    x = act(x)
    if use_lrn:
      x = self._lrn(x, columns)
    x = self._pool(x)
    x = act(self._conv(x, 'conv2', c2, 5, 2, groups=columns))
    if use_lrn:
      x = self._lrn(x, columns)
    x = self._pool(x)
    x = self._gather_columns(x)
    x = act(self._conv(x, 'conv3', c3, 3, 1))
    x = act(self._conv(x, 'conv4', c4, 3, 1, groups=columns))
    x = act(self._conv(x, 'conv5', c5, 3, 1, groups=columns))
    x = self._pool(x)
    # Gather channels before flattening, so fc6's weight rows keep the global
    # (height, width, channel) order of the single-device model.
    x = self._gather_columns(x)
    x = x.reshape(x.shape[0], -1)

    before = arch.dropout_position == 'before'
    if before:
      x = self._dropout(x, train)
    if self.batch_axis is not None:
      # One weird trick: the FC layers are model parallel over the devices
      # that ran the convolutions data parallel, so each needs every example.
      local_batch = x.shape[0]
      x = lax.all_gather(x, self.batch_axis, axis=0, tiled=True)

    fc = self.scaled(arch.fc_features) // self.fc_shards
    x = act(self._dense(x, 'fc6', fc))
    x = self._dropout(x, train)
    x = self._gather_neurons(x)
    x = act(self._dense(x, 'fc7', fc))
    if not before:
      x = self._dropout(x, train)
    # A replicated fc8 computes the same logits on every device: its input is
    # gathered 'invarying' so its gradient is not summed over the devices.
    x = self._gather_neurons(x, invarying=not self.fc8_is_sharded())
    if self.fc8_is_sharded():
      x = self._dense(x, 'fc8', self.num_classes // self.fc_shards)
      x = self._gather_neurons(x, invarying=True)
    else:
      x = self._dense(x, 'fc8', self.num_classes)

    if self.batch_axis is not None:
      # Back to this device's own examples, so the loss is per batch shard in
      # every scheme.
      index = lax.axis_index(self.batch_axis)
      x = lax.dynamic_slice_in_dim(x, index * local_batch, local_batch, axis=0)
    # Logits for the softmax in at least float32, whatever the compute dtype.
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def hidden_features(model: AlexNet, params, images: jax.Array,
                    layer: str = 'fc7') -> jax.Array:
  """A layer's activations after its non-linearity, in test mode, on one
  device: fc7's are the 4096-d vectors whose Euclidean distances find the
  neighbours of Figure 4 (section 6.1)."""
  if layer not in CONV_LAYERS + FC_LAYERS[:2]:
    raise ValueError(f'layer must be one of {CONV_LAYERS + FC_LAYERS[:2]}, '
                     f'got {layer!r}')
  _, state = model.apply(
      {'params': params}, images, train=False, mutable=['intermediates'],
      capture_intermediates=lambda m, method: (m.name == layer
                                               and method == '__call__'))
  (outputs,) = state['intermediates'][layer]['__call__']
  return ACTIVATIONS[model.activation](outputs)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


def layer_shapes(model: AlexNet, image_size: int) -> dict[str, tuple[int, ...]]:
  """Output shape (batch 1) of every layer, read from the traced model."""
  shapes = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.name:
      shapes[context.module.name] = tuple(out.shape)
    return out

  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  return shapes


def input_shape(image_size: int, batch: int = 1) -> Sequence[int]:
  return (batch, image_size, image_size, 3)


def from_config(config) -> AlexNet:
  """The network a config describes (its `model` fields)."""
  m = config.model
  return AlexNet(
      variant=m.variant, num_classes=m.num_classes,
      dropout_rate=m.dropout_rate, dtype=jnp.dtype(m.dtype),
      param_dtype=jnp.float64 if m.dtype == 'float64' else jnp.float32,
      width=m.width,
      use_lrn={'default': None, 'on': True, 'off': False}[m.lrn],
      lrn_n=m.lrn_n, lrn_k=m.lrn_k, lrn_alpha=m.lrn_alpha,
      lrn_beta=m.lrn_beta,
      lrn_across_columns=m.get('lrn_across_columns', False),
      pool_window=m.pool_window,
      pool_stride=m.pool_stride, init_scheme=m.init_scheme,
      # Absent from the config.json of runs older than the field.
      activation=m.get('activation', 'relu'),
      conv1=m.get('conv1', 'auto'),
      grouped_conv=m.get('grouped_conv', 'auto'),
      pooling=m.get('pooling', 'auto'))
