"""Tests of the paper's SGD and the learning-rate schedules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import optim
from configs import default

BASE_LR = 0.01


def _config(**optimizer):
  config = default.get_config()
  config.optimizer.learning_rate = BASE_LR
  for key, value in optimizer.items():
    config.optimizer[key] = value
  return config


# --- The plateau schedule ----------------------------------------------------


def _rates(config, errors, *, compiled=True):
  """The learning rate in force after each evaluation.

  `compiled` runs the update under jit, which is quicker than eager
  `lax.cond`s; the trainer calls it eagerly, as `compiled=False` does.
  """
  state = optim.init_schedule_state(config)
  update = lambda s, e: optim.update_schedule_state(config, s, e)
  if compiled:
    update = jax.jit(update)
  rates = []
  for error in errors:
    state = update(state, error)
    rates.append(optim.learning_rate(config, 0, 100, state))
  return rates


def _assert_rates(got, want):
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    assert g == pytest.approx(w, rel=1e-5), f'evaluation {i + 1}: {got}'


def test_plateau_starts_at_base_rate():
  config = _config(schedule='plateau')
  state = optim.init_schedule_state(config)
  assert optim.learning_rate(config, 0, 100, state) == pytest.approx(BASE_LR)


def test_plateau_divides_by_ten_after_patience_evaluations():
  config = _config(schedule='plateau', plateau_patience=2,
                   plateau_threshold=1e-3, plateau_factor=0.1, max_drops=3)
  errors = [
      0.90,    # 1: first value: best
      0.80,    # 2: improves
      0.80,    # 3: 1 without improvement
      0.80,    # 4: 2 without improvement: divide by 10
      0.80,    # 5: 1 (the count restarted after the drop)
      0.7995,  # 6: 2 (a drop smaller than the threshold does not count)
      0.50,    # 7: improves
      0.60,    # 8: 1
      0.49,    # 9: improves by more than the threshold: count back to 0
      0.49,    # 10: 1
      0.49,    # 11: 2: third division
      0.49, 0.49, 0.49, 0.49, 0.49, 0.49,  # 12..17: max_drops reached
  ]
  want = ([BASE_LR] * 3 + [BASE_LR / 10] * 2 + [BASE_LR / 100] * 5
          + [BASE_LR / 1000] * 7)
  _assert_rates(_rates(config, errors, compiled=False), want)


def test_plateau_patience_counts_evaluations():
  # Default patience 4: three flat evaluations then an improvement never
  # reach it; four flat evaluations in a row do, at the fourth.
  config = _config(schedule='plateau', plateau_patience=4)
  errors = [0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4]
  want = [BASE_LR] * 8 + [BASE_LR / 10]
  _assert_rates(_rates(config, errors), want)


def test_plateau_improvement_resets_the_count():
  config = _config(schedule='plateau', plateau_patience=3)
  # Improving every third evaluation keeps the rate forever.
  errors = []
  error = 0.9
  for _ in range(5):
    errors += [error, error + 0.01, error + 0.02]
    error -= 0.05
  _assert_rates(_rates(config, errors), [BASE_LR] * len(errors))


@pytest.mark.parametrize('max_drops', [0, 1, 2, 3])
def test_plateau_never_drops_more_than_max_drops(max_drops):
  config = _config(schedule='plateau', plateau_patience=1,
                   max_drops=max_drops)
  rates = _rates(config, [0.5] * 12)
  # Evaluation 1 sets the best; each later one is a plateau of patience 1.
  drops = sum(1 for a, b in zip(rates, rates[1:]) if b < 0.5 * a)
  assert drops == max_drops
  assert rates[-1] == pytest.approx(BASE_LR * 0.1 ** max_drops, rel=1e-5)
  assert min(rates) == pytest.approx(BASE_LR * 0.1 ** max_drops, rel=1e-5)


def test_plateau_factor_is_configurable():
  config = _config(schedule='plateau', plateau_patience=1,
                   plateau_factor=0.5, max_drops=2)
  _assert_rates(_rates(config, [0.5] * 5),
                [BASE_LR, BASE_LR / 2, BASE_LR / 4, BASE_LR / 4, BASE_LR / 4])


def test_step_schedule():
  config = _config(schedule='step', step_epochs=30, max_drops=3,
                   plateau_factor=0.1)
  steps_per_epoch = 10
  state = optim.init_schedule_state(config)
  rate = lambda step: optim.learning_rate(config, step, steps_per_epoch, state)
  # Divided by 10 every 30 epochs = 300 steps, at most three times.
  expected = {0: 1e-2, 299: 1e-2, 300: 1e-3, 599: 1e-3, 600: 1e-4, 899: 1e-4,
              900: 1e-5, 1200: 1e-5, 10_000: 1e-5}
  for step, want in expected.items():
    assert rate(step) == pytest.approx(want, rel=1e-9), step


def test_step_schedule_ignores_validation_error():
  config = _config(schedule='step', plateau_patience=1)
  state = optim.init_schedule_state(config)
  for _ in range(5):
    state = optim.update_schedule_state(config, state, 0.5)
  assert optim.learning_rate(config, 0, 10, state) == pytest.approx(BASE_LR)


def test_constant_schedule():
  config = _config(schedule='constant')
  state = optim.init_schedule_state(config)
  for step in (0, 1000, 10**6):
    assert optim.learning_rate(config, step, 10, state) == BASE_LR


# --- SGD with momentum and weight decay ---------------------------------------


def _params():
  rng = np.random.default_rng(0)
  return {
      'conv1': {'kernel': rng.standard_normal((2, 3)).astype(np.float32),
                'bias': rng.standard_normal(3).astype(np.float32)},
      'fc8': {'kernel': rng.standard_normal((3, 2)).astype(np.float32),
              'bias': rng.standard_normal(2).astype(np.float32)},
  }


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
      lambda p: rng.standard_normal(p.shape).astype(np.float32), _params())


def _run_optimizer(config, lrs):
  """Applies make_optimizer for len(lrs) steps; returns params after each."""
  tx = optim.make_optimizer(config)
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  history = []
  for step, lr in enumerate(lrs):
    state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
    updates, state = tx.update(jax.tree.map(jnp.asarray, _grads(step)), state,
                               params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    history.append(jax.tree.map(np.asarray, params))
  return history


def _by_hand(lrs, *, convention, momentum=0.9, weight_decay=5e-4,
             decay_biases=False):
  """The update rules written out, in float64, leaf by leaf."""
  params = jax.tree.map(lambda p: p.astype(np.float64), _params())
  velocity = jax.tree.map(np.zeros_like, params)
  history = []
  for step, lr in enumerate(lrs):
    grads = _grads(step)
    new_params, new_velocity = {}, {}
    for layer in params:
      new_params[layer], new_velocity[layer] = {}, {}
      for name, w in params[layer].items():
        v = velocity[layer][name]
        g = grads[layer][name].astype(np.float64)
        wd = weight_decay if (name == 'kernel' or decay_biases) else 0.0
        if convention == 'paper':
          # v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v (section 5).
          v = momentum * v - wd * lr * w - lr * g
          w = w + v
        else:
          # PyTorch: v <- 0.9 v + grad + wd w; w <- w - lr v.
          v = momentum * v + g + wd * w
          w = w - lr * v
        new_params[layer][name], new_velocity[layer][name] = w, v
    params, velocity = new_params, new_velocity
    history.append(params)
  return history


LRS = [0.01, 0.01, 0.01, 0.001, 0.001]


def _assert_tree_close(got, want, **kwargs):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, err_msg=jax.tree_util.keystr(path),
                               **kwargs)


@pytest.mark.parametrize('convention', ['paper', 'torch'])
def test_momentum_conventions_match_by_hand(convention):
  config = _config(momentum_convention=convention)
  got = _run_optimizer(config, LRS)
  want = _by_hand(LRS, convention=convention)
  assert len(got) == len(want) == len(LRS)
  for g, w in zip(got, want):
    _assert_tree_close(g, w, rtol=1e-5, atol=1e-7)


def test_conventions_differ_only_after_a_rate_change():
  paper = _run_optimizer(_config(momentum_convention='paper'), LRS)
  torch = _run_optimizer(_config(momentum_convention='torch'), LRS)
  max_diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  # Same while the rate is constant (steps 1..3) ...
  for step in range(3):
    assert max_diff(paper[step], torch[step]) < 1e-6, step
  # ... and not right after it drops: the paper's velocity still carries the
  # old rate, PyTorch's is rescaled by the new one.
  assert max_diff(paper[3], torch[3]) > 1e-3


@pytest.mark.parametrize('decay_biases', [False, True])
def test_weight_decay_and_biases(decay_biases):
  config = _config(momentum_convention='paper', decay_biases=decay_biases,
                   weight_decay=0.1, momentum=0.0)
  tx = optim.make_optimizer(config)
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  state.hyperparams['learning_rate'] = jnp.asarray(0.5, jnp.float32)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  for layer in params:
    kernel = np.asarray(params[layer]['kernel'])
    bias = np.asarray(params[layer]['bias'])
    # With no gradient, decay alone moves a weight by -lr * wd * w.
    np.testing.assert_allclose(np.asarray(updates[layer]['kernel']),
                               -0.5 * 0.1 * kernel, rtol=1e-6)
    want_bias = -0.5 * 0.1 * bias if decay_biases else np.zeros_like(bias)
    np.testing.assert_allclose(np.asarray(updates[layer]['bias']), want_bias,
                               rtol=1e-6, atol=0)


def test_decay_biases_by_hand():
  config = _config(momentum_convention='paper', decay_biases=True)
  got = _run_optimizer(config, LRS)
  want = _by_hand(LRS, convention='paper', decay_biases=True)
  _assert_tree_close(got[-1], want[-1], rtol=1e-5, atol=1e-7)


# --- Learning-rate multipliers for larger batches -----------------------------


def _all_layers():
  return {layer: {'kernel': np.zeros((2, 2)), 'bias': np.zeros(2)}
          for layer in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6',
                        'fc7', 'fc8')}


@pytest.mark.parametrize('rule, conv, fc', [
    ('none', 1.0, 1.0),
    ('sqrt', 2.0, 2.0),          # sqrt(512 / 128)
    ('linear_conv', 4.0, 1.0),   # 512 / 128 for the convs only
])
def test_layer_lr_multipliers(rule, conv, fc):
  config = _config(batch_scaling=rule, reference_batch_size=128)
  config.batch_size = 512
  multipliers = optim.layer_lr_multipliers(config, _all_layers())
  for layer, leaves in multipliers.items():
    want = conv if layer.startswith('conv') else fc
    for name, value in leaves.items():
      assert float(value) == pytest.approx(want), (layer, name)


def test_layer_lr_multipliers_at_reference_batch_are_one():
  for rule in ('none', 'sqrt', 'linear_conv'):
    config = _config(batch_scaling=rule, reference_batch_size=256)
    config.batch_size = 256
    for value in jax.tree.leaves(optim.layer_lr_multipliers(config,
                                                            _all_layers())):
      assert float(value) == 1.0


def test_the_step_multiplies_nothing_under_none():
  config = _config(batch_scaling='none', reference_batch_size=128)
  config.batch_size = 512
  assert optim.step_lr_multipliers(config, _all_layers()) is None
  config = _config(batch_scaling='linear_conv', reference_batch_size=128)
  config.batch_size = 512
  assert jax.tree.leaves(optim.step_lr_multipliers(config, _all_layers())) == (
      jax.tree.leaves(optim.layer_lr_multipliers(config, _all_layers())))


def test_sqrt_multiplier_for_uneven_ratio():
  config = _config(batch_scaling='sqrt', reference_batch_size=128)
  config.batch_size = 384
  for value in jax.tree.leaves(optim.layer_lr_multipliers(config,
                                                          _all_layers())):
    assert float(value) == pytest.approx(math.sqrt(3))


def test_head_only_training_moves_fc8_alone():
  # trainable='head': fc8 follows the paper's update exactly, every other
  # layer stays where it started (a new classifier on fixed features).
  config = _config(momentum_convention='paper')
  config.trainable = 'head'
  got = _run_optimizer(config, LRS)
  want = _by_hand(LRS, convention='paper')
  start = _params()
  for g, w in zip(got, want):
    _assert_tree_close(g['fc8'], w['fc8'], rtol=1e-5, atol=1e-7)
    for name, value in g['conv1'].items():
      np.testing.assert_array_equal(value, start['conv1'][name])
