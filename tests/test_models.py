"""Tests of the AlexNet module, LRN and the paper's initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import models

# Smallest input of the 'original' network whose pool5 is non-empty: keeps the
# compiled graphs tiny.
SMALL_SIZE = 67


def _abstract_params(model, image_size):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False))['params']


# Parameter counts, layer by layer, written out from the paper's table
# (ALEXNET.md section 1): kernel height * width * input maps per group *
# kernels + biases. The grouped layers of the original see 48 / 128 / 192 maps.
ORIGINAL_PARAMS = {
    'conv1': 11 * 11 * 3 * 96 + 96,
    'conv2': 5 * 5 * 48 * 256 + 256,
    'conv3': 3 * 3 * 256 * 384 + 384,
    'conv4': 3 * 3 * 192 * 384 + 384,
    'conv5': 3 * 3 * 192 * 256 + 256,
    'fc6': 6 * 6 * 256 * 4096 + 4096,
    'fc7': 4096 * 4096 + 4096,
    'fc8': 4096 * 1000 + 1000,
}
OWT_PARAMS = {
    'conv1': 11 * 11 * 3 * 64 + 64,
    'conv2': 5 * 5 * 64 * 192 + 192,
    'conv3': 3 * 3 * 192 * 384 + 384,
    'conv4': 3 * 3 * 384 * 256 + 256,
    'conv5': 3 * 3 * 256 * 256 + 256,
    'fc6': 6 * 6 * 256 * 4096 + 4096,
    'fc7': 4096 * 4096 + 4096,
    'fc8': 4096 * 1000 + 1000,
}

# The paper's one-column comparison (section 3.5, footnote 2): half the
# kernels of conv1-conv4, conv5 and the FC layers as in the two-column net.
ONE_COLUMN_PARAMS = {
    'conv1': 11 * 11 * 3 * 48 + 48,
    'conv2': 5 * 5 * 48 * 128 + 128,
    'conv3': 3 * 3 * 128 * 192 + 192,
    'conv4': 3 * 3 * 192 * 192 + 192,
    'conv5': 3 * 3 * 192 * 256 + 256,
    'fc6': 6 * 6 * 256 * 4096 + 4096,
    'fc7': 4096 * 4096 + 4096,
    'fc8': 4096 * 1000 + 1000,
}


@pytest.mark.parametrize('variant, image_size, total, per_layer', [
    ('original', 227, 60_965_224, ORIGINAL_PARAMS),
    ('owt', 224, 61_100_840, OWT_PARAMS),
    ('one_column', 227, 59_798_312, ONE_COLUMN_PARAMS),
])
def test_parameter_counts(variant, image_size, total, per_layer):
  params = _abstract_params(models.AlexNet(variant=variant), image_size)
  assert models.count_params(params) == total
  assert sum(per_layer.values()) == total
  assert {name: models.count_params(p) for name, p in params.items()
          } == per_layer


def test_fc6_sees_six_by_six_maps():
  # pool5 is 6x6x256 in both variants, so fc6 has 9216 inputs.
  for variant, size in (('original', 227), ('owt', 224)):
    params = _abstract_params(models.AlexNet(variant=variant), size)
    assert params['fc6']['kernel'].shape == (6 * 6 * 256, 4096)


# Output of every named layer (batch 1) in call order, from the paper's table:
# conv1 55x55, pools to 27, 13 and 6 (6*6*256 = 9216 features for fc6).
ORIGINAL_SHAPES = [
    ('conv1', (1, 55, 55, 96)),
    ('conv2', (1, 27, 27, 256)),
    ('conv3', (1, 13, 13, 384)),
    ('conv4', (1, 13, 13, 384)),
    ('conv5', (1, 13, 13, 256)),
    ('fc6', (1, 4096)),
    ('dropout', (1, 4096)),
    ('fc7', (1, 4096)),
    ('dropout', (1, 4096)),
    ('fc8', (1, 1000)),
]
OWT_SHAPES = [
    ('conv1', (1, 55, 55, 64)),
    ('conv2', (1, 27, 27, 192)),
    ('conv3', (1, 13, 13, 384)),
    ('conv4', (1, 13, 13, 256)),
    ('conv5', (1, 13, 13, 256)),
    ('dropout', (1, 9216)),
    ('fc6', (1, 4096)),
    ('dropout', (1, 4096)),
    ('fc7', (1, 4096)),
    ('fc8', (1, 1000)),
]


def _kinds(shapes):
  # Dropout modules get automatic names; everything else is named after its
  # layer.
  return [('dropout' if 'dropout' in name.lower() else name, shape)
          for name, shape in shapes.items()]


@pytest.mark.parametrize('variant, image_size, expected', [
    ('original', 227, ORIGINAL_SHAPES),
    ('owt', 224, OWT_SHAPES),
])
def test_layer_shapes(variant, image_size, expected):
  shapes = models.layer_shapes(models.AlexNet(variant=variant), image_size)
  assert _kinds(shapes) == expected


@pytest.mark.parametrize('variant, image_size', [('original', 227),
                                                 ('owt', 224)])
def test_feature_map_sizes(variant, image_size):
  assert models.feature_map_sizes(image_size, variant) == {
      'conv1': 55, 'pool1': 27, 'conv2': 27, 'pool2': 13, 'conv3': 13,
      'conv4': 13, 'conv5': 13, 'pool5': 6}


# --- Local response normalisation -------------------------------------------


def lrn_reference(a, n, k, alpha, beta):
  """The paper's formula, one channel at a time, in float64."""
  a = np.asarray(a, np.float64)
  num_channels = a.shape[-1]
  b = np.empty_like(a)
  for i in range(num_channels):
    lo = max(0, i - n // 2)
    hi = min(num_channels - 1, i + n // 2)
    s = np.zeros(a.shape[:-1])
    for j in range(lo, hi + 1):
      s += a[..., j] ** 2
    b[..., i] = a[..., i] / (k + alpha * s) ** beta
  return b


# Inputs are scaled so that alpha * sum(a^2) is comparable to k: otherwise the
# denominator is ~k^beta whatever the window, and a wrong window goes unseen.
LRN_CASES = [
    # n, k, alpha, beta, channels, input scale
    (5, 2.0, 1e-4, 0.75, 13, 100.0),   # the paper's constants
    (3, 1.0, 0.5, 0.5, 6, 1.0),
    (7, 0.5, 0.1, 1.0, 4, 2.0),        # window wider than the channels
    (1, 2.0, 1.0, 0.75, 5, 1.5),       # only the channel itself
    (5, 0.0, 1.0, 0.25, 9, 1.0),       # no additive constant
]


@pytest.mark.parametrize('n, k, alpha, beta, channels, scale', LRN_CASES)
def test_lrn_matches_paper_formula(n, k, alpha, beta, channels, scale):
  rng = np.random.default_rng(channels)
  x = (scale * rng.standard_normal((2, 3, 3, channels))).astype(np.float32)
  got = np.asarray(models.lrn(jnp.asarray(x), n=n, k=k, alpha=alpha,
                              beta=beta))
  want = lrn_reference(x, n, k, alpha, beta)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # The clipped ends of the window, checked on their own.
  np.testing.assert_allclose(got[..., 0], want[..., 0], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got[..., -1], want[..., -1], rtol=2e-5,
                             atol=1e-6)


def test_lrn_normalisation_is_not_negligible_in_cases():
  # Guards the test above: with these inputs the result is far from the
  # window-free value a / k^beta, so the window really is exercised.
  for n, k, alpha, beta, channels, scale in LRN_CASES:
    if k == 0.0:
      continue
    rng = np.random.default_rng(channels)
    x = scale * rng.standard_normal((2, 3, 3, channels))
    ratio = lrn_reference(x, n, k, alpha, beta) / (x / k ** beta)
    assert np.max(np.abs(ratio - 1)) > 0.05


def test_lrn_default_constants_are_the_papers():
  x = 50.0 * np.random.default_rng(0).standard_normal((1, 2, 2, 8))
  np.testing.assert_allclose(
      np.asarray(models.lrn(jnp.asarray(x, jnp.float32))),
      lrn_reference(x, 5, 2.0, 1e-4, 0.75), rtol=2e-5, atol=1e-6)


def test_lrn_keeps_bfloat16_dtype():
  x = 50.0 * np.random.default_rng(8).standard_normal((1, 2, 2, 8))
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  got = models.lrn(x_bf16)
  assert got.dtype == jnp.bfloat16
  # bfloat16 has 8 bits of mantissa: compare at its precision, against the
  # formula applied to the rounded input.
  np.testing.assert_allclose(
      np.asarray(got, np.float64),
      lrn_reference(np.asarray(x_bf16, np.float64), 5, 2.0, 1e-4, 0.75),
      rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize('n', [0, 2, 4, 6])
def test_lrn_rejects_even_or_empty_window(n):
  with pytest.raises(ValueError, match=f'n={n}'):
    models.lrn(jnp.ones((1, 1, 1, 8)), n=n)


def test_grouped_lrn_is_lrn_per_group():
  kwargs = dict(n=5, k=1.0, alpha=0.2, beta=0.75)
  x = np.random.default_rng(1).standard_normal((2, 3, 3, 12)).astype(
      np.float32)
  got = np.asarray(models.grouped_lrn(jnp.asarray(x), 2, **kwargs))
  want = np.concatenate([lrn_reference(x[..., :6], **kwargs),
                         lrn_reference(x[..., 6:], **kwargs)], axis=-1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)

  ungrouped = np.asarray(models.lrn(jnp.asarray(x), **kwargs))
  # With n=5 the ungrouped window of channels 4..7 reaches across the column
  # boundary (between 5 and 6); those of channels 0..3 and 8..11 do not.
  for channel in range(4, 8):
    assert np.max(np.abs(got[..., channel] - ungrouped[..., channel])) > 1e-3
  np.testing.assert_allclose(got[..., :4], ungrouped[..., :4], rtol=1e-6)
  np.testing.assert_allclose(got[..., 8:], ungrouped[..., 8:], rtol=1e-6)


def test_grouped_lrn_with_one_group_is_lrn():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 2, 6)),
                  jnp.float32)
  np.testing.assert_array_equal(np.asarray(models.grouped_lrn(x, 1, alpha=0.3)),
                                np.asarray(models.lrn(x, alpha=0.3)))


def test_lrn_gradient_matches_finite_differences():
  kwargs = dict(n=3, k=1.0, alpha=0.5, beta=0.75)
  x = np.random.default_rng(3).standard_normal((1, 1, 2, 5))
  weights = np.random.default_rng(4).standard_normal(x.shape)
  grad = jax.grad(lambda v: jnp.sum(models.lrn(v, **kwargs) * weights))(
      jnp.asarray(x, jnp.float32))
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))

  # Central differences of the float64 reference.
  eps = 1e-6
  numeric = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    numeric[index] = np.sum(
        (lrn_reference(up, **kwargs) - lrn_reference(down, **kwargs))
        * weights) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


# --- A quarter-width model at a small input --------------------------------


@pytest.fixture(scope='module')
def small_original():
  model = models.AlexNet(variant='original', width=0.25, num_classes=10)
  images = jnp.zeros((2, SMALL_SIZE, SMALL_SIZE, 3), jnp.float32)
  params = jax.jit(lambda: model.init(jax.random.key(0), images,
                                      train=False))()['params']
  return model, params


def test_paper_initialisation(small_original):
  _, params = small_original
  assert set(params) == {'conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6',
                         'fc7', 'fc8'}
  for layer, p in params.items():
    kernel = np.asarray(p['kernel'])
    # N(0, 0.01): the smallest kernel has over 10,000 entries, so the sample
    # std is within a few percent of 0.01.
    assert kernel.size > 1000, layer
    assert abs(kernel.std() - 0.01) < 0.0005, layer
    assert abs(kernel.mean()) < 0.0005, layer
    bias_value = 1.0 if layer in ('conv2', 'conv4', 'conv5', 'fc6',
                                  'fc7') else 0.0
    np.testing.assert_array_equal(np.asarray(p['bias']),
                                  np.full(p['bias'].shape, bias_value),
                                  err_msg=layer)


def test_he_initialisation_has_zero_biases():
  model = models.AlexNet(variant='original', width=0.25, num_classes=10,
                         init_scheme='he')
  images = jnp.zeros((1, SMALL_SIZE, SMALL_SIZE, 3), jnp.float32)
  params = jax.jit(lambda: model.init(jax.random.key(0), images,
                                      train=False))()['params']
  for layer, p in params.items():
    assert not np.any(np.asarray(p['bias'])), layer
  # He-normal: std sqrt(2 / fan_in); fc7's fan_in is 1024 at width 0.25.
  assert abs(np.asarray(params['fc7']['kernel']).std()
             - np.sqrt(2 / 1024)) < 0.003


def test_bfloat16_compute_returns_float32_logits(small_original):
  _, params = small_original
  model = models.AlexNet(variant='original', width=0.25, num_classes=10,
                         dtype=jnp.bfloat16)
  images = jnp.asarray(np.random.default_rng(5).standard_normal(
      (2, SMALL_SIZE, SMALL_SIZE, 3)), jnp.float32)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, images)
  assert logits.dtype == jnp.float32
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(np.asarray(logits)))
  # Parameters stay float32 whatever the compute dtype.
  own = _abstract_params(model, SMALL_SIZE)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(own))


def test_dropout_is_random_in_training_only(small_original):
  model, params = small_original
  images = jnp.asarray(np.random.default_rng(6).standard_normal(
      (2, SMALL_SIZE, SMALL_SIZE, 3)), jnp.float32)

  @jax.jit
  def apply_all():
    train = [model.apply({'params': params}, images, train=True,
                         rngs={'dropout': jax.random.key(seed)})
             for seed in (1, 2)]
    # Evaluation needs no dropout key and is deterministic.
    test = model.apply({'params': params}, images, train=False)
    return train, test

  (a, b), test = apply_all()
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 0
  assert np.max(np.abs(np.asarray(a) - np.asarray(test))) > 0
  # Compiled together or on its own, evaluation gives the same logits (up to
  # float32 rounding of a different fusion).
  np.testing.assert_allclose(
      np.asarray(test),
      np.asarray(model.apply({'params': params}, images, train=False)),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('variant', ['original', 'owt'])
def test_dropout_position_by_behaviour(variant):
  # With a dropout rate of 1 every dropped activation is zero. Dropout after
  # fc7 (original) leaves fc8 only its bias; dropout before fc7 (owt) leaves
  # fc8 the constant relu(b7) @ W8 + b8 instead.
  model = models.AlexNet(variant=variant, width=0.25, num_classes=10,
                         dropout_rate=1.0)
  images = jnp.asarray(np.random.default_rng(7).standard_normal(
      (2, SMALL_SIZE, SMALL_SIZE, 3)), jnp.float32)

  @jax.jit
  def init_and_apply():
    params = model.init(jax.random.key(0), images[:1], train=False)['params']
    return params, model.apply({'params': params}, images, train=True,
                               rngs={'dropout': jax.random.key(1)})

  params, logits = init_and_apply()
  logits = np.asarray(logits)
  b8 = np.asarray(params['fc8']['bias'], np.float64)
  w8 = np.asarray(params['fc8']['kernel'], np.float64)
  b7 = np.asarray(params['fc7']['bias'], np.float64)
  constant = np.maximum(b7, 0) @ w8 + b8
  assert np.max(np.abs(constant - b8)) > 1e-3  # the two cases differ
  want = b8 if variant == 'original' else constant
  np.testing.assert_allclose(logits, np.broadcast_to(want, logits.shape),
                             rtol=1e-5, atol=1e-6)


def _small_input(seed=5, batch=2):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(
      (batch, SMALL_SIZE, SMALL_SIZE, 3)), jnp.float32)


def test_fc7_features_feed_fc8(small_original):
  # In test mode the logits are fc8 applied to fc7's activations, so the
  # features Figure 4 compares are exactly what the classifier sees.
  model, params = small_original
  images = _small_input()
  features = models.hidden_features(model, params, images, 'fc7')
  assert features.shape == (2, 1024)
  assert float(jnp.min(features)) >= 0.0  # after the ReLU
  logits = model.apply({'params': params}, images, train=False)
  np.testing.assert_allclose(
      features @ params['fc8']['kernel'] + params['fc8']['bias'], logits,
      rtol=1e-5, atol=1e-5)


def test_hidden_features_refuses_other_layers(small_original):
  model, params = small_original
  with pytest.raises(ValueError, match='fc8'):
    models.hidden_features(model, params, _small_input(), 'fc8')


def test_tanh_network_saturates_and_differs_from_relu(small_original):
  relu_model, params = small_original
  tanh_model = relu_model.clone(activation='tanh')
  images = 100.0 * _small_input()
  features = models.hidden_features(tanh_model, params, images, 'fc7')
  # Bounded by tanh (the paper's initialisation puts fc7's bias at 1, so
  # these sit near tanh(1) rather than around 0).
  assert float(jnp.max(jnp.abs(features))) <= 1.0
  assert not np.allclose(features, models.hidden_features(
      relu_model, params, images, 'fc7'))
  np.testing.assert_allclose(
      features @ params['fc8']['kernel'] + params['fc8']['bias'],
      tanh_model.apply({'params': params}, images, train=False),
      rtol=1e-5, atol=1e-5)
  assert not np.allclose(
      tanh_model.apply({'params': params}, images, train=False),
      relu_model.apply({'params': params}, images, train=False))


def test_unknown_activation_is_refused(small_original):
  model, params = small_original
  with pytest.raises(ValueError, match='activation'):
    model.clone(activation='sigmoid').apply({'params': params},
                                            _small_input(), train=False)
