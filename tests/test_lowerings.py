"""The lowerings chosen per platform compute the same function.

conv1 by space-to-depth is the direct convolution, in every scheme; the
column-grouped convolutions split into one convolution per group are the
grouped ones.

`model.conv1='space_to_depth'` folds 4x4 pixel blocks into channels and the
stored 11x11 kernel into a 3x3 one inside the forward pass. As a
specification: the parameter tree and its initial values are the direct
model's; the logits agree for every input size the network accepts (whatever
padding it takes to reach whole blocks); and the loss and every gradient
agree, to test_parallel's 1e-5 norm-relative tolerance in float32, with the
direct single-device model's under none, data, two_column and weird_trick,
each on one of 2, 4 and 8 simulated devices. test_parallel holds the direct
model under each scheme to the same reference; its batch, parameters and
tolerance are reused.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_parallel
from alexnet_jax import models, parallel, train

VARIANTS = ('original', 'owt')
# Space-to-depth changes what each device computes for its own rows, not what
# the scheme gathers or sums, so every scheme and variant is checked on one
# mesh, the three sizes shared out among them (two_column also on 2x2, whose
# columns are split over the batch too).
CASES = [('none', 'original', 1), ('none', 'owt', 1),
         ('data', 'original', 8), ('data', 'owt', 2),
         ('two_column', 'original', 2), ('two_column', 'original', 4),
         ('weird_trick', 'original', 4), ('weird_trick', 'owt', 8)]


@pytest.fixture(scope='module')
def direct():
  """The direct single-device model of each variant: the reference, its
  initial parameters, and its loss and gradients on test_parallel's batch."""

  @functools.cache
  def build(variant):
    setup = test_parallel.Setup('none', variant, 1)
    setup.model = setup.model.clone(conv1='direct')
    return setup
  return build


def folded_first_batch_grads(reference: test_parallel.Setup, case):
  """(gradients, metrics) of the reference's first batch and parameters with
  conv1 by space-to-depth, under the case's scheme. The reference's
  parameters are resharded, not initialised again: a test of the same
  function at the same point."""
  parallelism, variant, num_devices = case
  config = test_parallel.make_config(parallelism, num_devices, variant)
  scheme = parallel.make_scheme(parallelism, train.select_devices(config))
  model = models.from_config(config).clone(conv1='space_to_depth')
  specs = scheme.param_specs(reference.initial['params'], model)
  params = jax.device_put(
      reference.initial['params'],
      jax.tree.map(scheme.sharding, specs,
                   is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  grad_fn = jax.jit(train.make_grad_fn(model, scheme, specs))
  batch = train.global_batch(scheme, next(reference.train_batches()))
  return jax.device_get(grad_fn(params, batch, jax.random.key(0)))


@pytest.mark.parametrize('variant', VARIANTS)
def test_same_parameters(direct, variant):
  reference = direct(variant)
  model = reference.model.clone(conv1='space_to_depth')
  images = jnp.zeros(models.input_shape(test_parallel.IMAGE_SIZE))
  got = jax.jit(lambda: model.init(jax.random.key(reference.config.seed),
                                   images, train=False)['params'])()
  want = jax.device_get(reference.initial['params'])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert got['conv1']['kernel'].shape == (11, 11, 3, model.scaled(
      model.arch.conv_features[0]))


# Both conv1 paddings (0 and 2) and every remainder of the padded input size
# mod 4: the fold pads up to whole blocks or leaves out the pixels that the
# stride skips too.
@pytest.mark.parametrize('padding', [0, 2])
@pytest.mark.parametrize('size', [67, 68, 69, 70])
def test_conv1_layer_same_outputs_and_gradients(padding, size):
  images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  direct_conv = nn.Conv(8, (11, 11), strides=(4, 4),
                        padding=((padding, padding),) * 2)
  folded_conv = models.SpaceToDepthConv(8, 11, 4, padding)
  params = direct_conv.init(jax.random.key(1), images)

  @jax.jit
  def outputs_and_grads(params):
    def run(conv):
      loss = lambda p: jnp.sum(jnp.sin(conv.apply(p, images)))
      return conv.apply(params, images), jax.grad(loss)(params)
    return run(direct_conv), run(folded_conv)

  (want, want_grads), (got, got_grads) = outputs_and_grads(params)
  test_parallel.assert_close(got, want, f'conv1 output, {size}x{size}')
  test_parallel.assert_trees_close(got_grads, want_grads, 'conv1 gradient')


# A batch small enough to be computed whole (10 at 99x99) and large ones in
# tiles: kernels within a tile (12), more than a tile (24: a block and a
# half; 40: two and a half) and in multiples of 64 (whole in the forward
# pass); weight-gradient slices of 8 images, the last one short, and of 9
# for 70, which would take more than TILE_SLICES slices of 8.
@pytest.mark.parametrize('padding', [0, 2])
@pytest.mark.parametrize('features,batch', [(24, 10), (12, 60), (40, 60),
                                            (64, 70)])
def test_tiled_conv1_is_the_direct_one(padding, features, batch):
  images = jax.random.normal(jax.random.key(0), (batch, 99, 99, 3))
  direct_conv = nn.Conv(features, (11, 11), strides=(4, 4),
                        padding=((padding, padding),) * 2)
  tiled = models.TiledConv(features, 11, 4, padding)
  params = direct_conv.init(jax.random.key(1), images)
  assert jax.tree.structure(tiled.init(jax.random.key(1), images)) == (
      jax.tree.structure(params))

  @jax.jit
  def outputs_and_grads(params, images):
    def run(conv):
      loss = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
      return conv.apply(params, images), jax.grad(loss, (0, 1))(params,
                                                                 images)
    return run(direct_conv), run(tiled)

  (want, want_grads), (got, got_grads) = outputs_and_grads(params, images)
  test_parallel.assert_close(got, want, f'conv1 output, {features} kernels')
  test_parallel.assert_trees_close(got_grads, want_grads,
                                   'conv1 kernel, bias and input gradients')


@pytest.mark.parametrize('variant,size', [('original', 227), ('owt', 224)])
def test_same_logits(variant, size):
  model = models.AlexNet(variant=variant, width=0.25, num_classes=10,
                         init_scheme='he')
  images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  params = jax.jit(model.init, static_argnames='train')(
      jax.random.key(1), images, train=False)['params']
  logits = jax.jit(lambda params: [
      model.clone(conv1=mode).apply({'params': params}, images, train=False)
      for mode in ('direct', 'space_to_depth', 'tiled')])
  want, *got = logits(params)
  for mode, value in zip(('space_to_depth', 'tiled'), got):
    test_parallel.assert_close(value, want,
                               f'{variant} {size}x{size} logits, {mode}')


@pytest.mark.parametrize('case', CASES, ids=test_parallel.case_id)
def test_same_loss_and_gradients_in_every_scheme(direct, case):
  _, variant, _ = case
  reference = direct(variant)
  grads, metrics = folded_first_batch_grads(reference, case)
  want_grads, want_metrics = reference.first_batch_grads
  for name in ('loss', 'top1', 'top5'):
    test_parallel.assert_close(metrics[name], want_metrics[name], name)
  test_parallel.assert_trees_close(grads, want_grads, 'gradient')


def test_auto_follows_the_platform():
  assert models.lowering('conv1', 'auto', 'cpu') == 'tiled'
  assert models.lowering('conv1', 'auto', 'gpu') == 'space_to_depth'
  assert models.lowering('conv1', 'direct', 'gpu') == 'direct'
  assert models.lowering('grouped_conv', 'auto', 'cpu') == 'split'
  assert models.lowering('grouped_conv', 'auto', 'gpu') == 'grouped'
  assert models.lowering('pooling', 'auto', 'cpu') == 'strided'
  assert models.lowering('pooling', 'auto', 'tpu') == 'reduce_window'
  with pytest.raises(ValueError, match='model.conv1'):
    models.lowering('conv1', 'winograd')


def test_split_grouped_convolutions_are_the_grouped_ones():
  # Same parameters (tree and initial values), logits and every gradient.
  model = models.AlexNet(variant='original', width=0.25, num_classes=10,
                         init_scheme='he', dropout_rate=0.0)
  images = jax.random.normal(jax.random.key(0), (4, 67, 67, 3))
  labels = jnp.arange(4) % 10

  @jax.jit
  def run():
    out = {}
    for mode in ('grouped', 'split'):
      net = model.clone(grouped_conv=mode)
      params = net.init(jax.random.key(1), images, train=False)['params']
      loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
          net.apply({'params': p}, images, train=False), labels).mean()
      out[mode] = (params, net.apply({'params': params}, images, train=False),
                   jax.grad(loss)(params))
    return out

  out = run()
  (params, logits, grads), (split_params, split_logits, split_grads) = (
      out['grouped'], out['split'])
  assert jax.tree.structure(params) == jax.tree.structure(split_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(split_params)):
    np.testing.assert_array_equal(a, b)
  assert params['conv2']['kernel'].shape == (5, 5, 12, 64)  # per group
  test_parallel.assert_close(split_logits, logits, 'logits')
  test_parallel.assert_trees_close(split_grads, grads, 'gradient')



@pytest.mark.parametrize('window,stride,size', [(3, 2, 13), (3, 2, 12),
                                                (2, 2, 11)])
def test_strided_pooling_is_reduce_window_pooling(window, stride, size):
  # The values, and the gradient to the first maximum of each window, ties
  # included: after a ReLU most windows of zeros are ties.
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, size, size, 5)))
  x = x.at[0, :4, :4, 0].set(1.0)  # ties among positive values too
  weights = jax.random.normal(jax.random.key(1), ((size - window) // stride
                                                  + 1,) * 2 + (5,))
  pools = {
      'reduce_window': lambda x: nn.max_pool(x, (window,) * 2, (stride,) * 2),
      'strided': lambda x: models.strided_max_pool(x, window, stride)}
  results = {name: jax.jit(jax.value_and_grad(
      lambda x, pool=pool: jnp.sum(pool(x) * weights)))(x)
             for name, pool in pools.items()}
  (want, want_grad), (got, got_grad) = (results['reduce_window'],
                                        results['strided'])
  np.testing.assert_array_equal(got, want)
  # The same input chosen in every window; where two overlapping windows
  # choose one input its two shares are added in another order.
  np.testing.assert_array_equal(got_grad != 0, want_grad != 0)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)


def test_the_network_in_every_lowering_is_the_same():
  # All three choices at once against all three defaults of the other
  # platform, on the whole original network: logits and every gradient.
  model = models.AlexNet(variant='original', width=0.25, num_classes=10,
                         init_scheme='he', dropout_rate=0.0)
  images = jax.random.normal(jax.random.key(0), (4, 67, 67, 3))
  labels = jnp.arange(4) % 10
  cpu = {f: models.LOWERINGS[f][1] for f in models.LOWERINGS}
  accelerator = {f: models.LOWERINGS[f][2] for f in models.LOWERINGS}

  @jax.jit
  def run():
    out = []
    for choice in (cpu, accelerator):
      net = model.clone(**choice)
      params = net.init(jax.random.key(1), images, train=False)['params']
      loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
          net.apply({'params': p}, images, train=False), labels).mean()
      out.append((params, net.apply({'params': params}, images, train=False),
                  jax.grad(loss)(params)))
    return out

  (params, logits, grads), (other_params, other_logits, other_grads) = run()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other_params)):
    np.testing.assert_array_equal(a, b)
  test_parallel.assert_close(other_logits, logits, 'logits')
  test_parallel.assert_trees_close(other_grads, grads, 'gradient')
