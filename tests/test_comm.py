"""The communication report against a count by hand from the layer table.

The network is the 'synthetic' config of configs/two_gpu.py: the original
two-column AlexNet at width 0.25 on 99x99 images, batch 16, 10 classes,
float32, on 2 devices. Every expected shape below is derived here from the
layer table (ALEXNET.md section 1) and the schemes (section 6), not read from
the report:

  conv1 11x11 stride 4:  (99 - 11) // 4 + 1 = 23      24 maps (96 x 0.25)
  pool1 3/2:             (23 - 3) // 2 + 1 = 11
  conv2 5x5 pad 2:       11                          64 maps, 2 groups
  pool2 3/2:             (11 - 3) // 2 + 1 = 5
  conv3..conv5 3x3 pad 1: 5                          96, 96, 64 maps
  pool5 3/2:             (5 - 3) // 2 + 1 = 2
  fc6, fc7               1024 neurons (4096 x 0.25), fc8 10 classes

Bytes moved per device per step, for an array of B bytes in a group of n
devices (the module's convention): all-gather B_out (n-1)/n, reduce-scatter
B_in (n-1)/n, all-reduce 2 B (n-1)/n. With n = 2: half the gathered array,
half the scattered input, the whole all-reduced array.

Only collectives whose groups hold more than one device are compared exactly:
XLA may drop an all-reduce over a group of one device (a no-op) or keep it,
and may combine all-reduces into one tuple or not, depending on how much it
optimises (the tests run with `jax_disable_most_optimizations`); the report
lists one row per array either way.
"""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys

import jax
import pytest

from commands import command_env
from alexnet_jax import comm
from configs import two_gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N = 2            # devices
B = 16           # global batch
F32 = 4          # bytes
CLASSES = 10
POOL2, POOL5 = 5, 2
C1, C2, C3, C4, C5 = 24, 64, 96, 96, 64
FC = 1024

# Parameters of the single-device model, layer by layer. conv2, conv4 and
# conv5 see only their own column's maps: half of the previous layer's.
PARAMS = {
    'conv1': {'kernel': 11 * 11 * 3 * C1, 'bias': C1},
    'conv2': {'kernel': 5 * 5 * (C1 // 2) * C2, 'bias': C2},
    'conv3': {'kernel': 3 * 3 * C2 * C3, 'bias': C3},
    'conv4': {'kernel': 3 * 3 * (C3 // 2) * C4, 'bias': C4},
    'conv5': {'kernel': 3 * 3 * (C4 // 2) * C5, 'bias': C5},
    'fc6': {'kernel': POOL5 * POOL5 * C5 * FC, 'bias': FC},
    'fc7': {'kernel': FC * FC, 'bias': FC},
    'fc8': {'kernel': FC * CLASSES, 'bias': CLASSES},
}
CONV = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')
CONV_PARAMS = sum(sum(PARAMS[l].values()) for l in CONV)
ALL_PARAMS = sum(sum(p.values()) for p in PARAMS.values())
# The train step's psum of the loss, top-1, top-5 and example count.
METRIC_SCALARS = 4


def gathered(shape):
  """Bytes one device receives when an all-gather of n=2 returns `shape`."""
  return math.prod(shape) * F32 // 2


def scattered(shape):
  """Bytes one device sends when a reduce-scatter of n=2 returns `shape`."""
  return math.prod(shape) * N * F32 // 2


# (kind, pass, result shape) of every activation collective.
TWO_COLUMN = [
    # conv3 sees both columns' pool2 maps; fc6 both columns' pool5 maps; each
    # FC layer every neuron of the one before; the loss every logit.
    ('all-gather', 'fwd', (B, POOL2, POOL2, C2)),
    ('all-gather', 'fwd', (B, POOL5, POOL5, C5)),
    ('all-gather', 'fwd', (B, FC)),
    ('all-gather', 'fwd', (B, FC)),
    ('all-gather', 'fwd', (B, CLASSES)),
    # The transpose of a gather is a reduce-scatter back to this column's
    # half. The logits' gather is 'invarying' (both devices compute the same
    # loss), so its transpose is a local slice: no fifth one.
    ('reduce-scatter', 'bwd', (B, POOL2, POOL2, C2 // 2)),
    ('reduce-scatter', 'bwd', (B, POOL5, POOL5, C5 // 2)),
    ('reduce-scatter', 'bwd', (B, FC // 2)),
    ('reduce-scatter', 'bwd', (B, FC // 2)),
]
TWO_COLUMN_BYTES = (
    gathered((B, POOL2, POOL2, C2)) + gathered((B, POOL5, POOL5, C5))
    + 2 * gathered((B, FC)) + gathered((B, CLASSES))
    + scattered((B, POOL2, POOL2, C2 // 2))
    + scattered((B, POOL5, POOL5, C5 // 2)) + 2 * scattered((B, FC // 2)))

WEIRD_TRICK = [
    # fc6 runs on every example: the conv5 features of both batch halves.
    ('all-gather', 'fwd', (B, POOL5 * POOL5 * C5)),
    ('all-gather', 'fwd', (B, FC)),
    ('all-gather', 'fwd', (B, FC)),
    ('all-gather', 'fwd', (B, CLASSES)),
    # Back to this device's examples: the features' gradient of its half.
    ('reduce-scatter', 'bwd', (B // N, POOL5 * POOL5 * C5)),
    ('reduce-scatter', 'bwd', (B, FC // 2)),
    ('reduce-scatter', 'bwd', (B, FC // 2)),
    # The logits are sliced to the local examples with the device's index,
    # which makes them per device: the transpose sums the padded cotangents
    # of both halves into every device's full (B, classes) cotangent.
    ('all-reduce', 'bwd', (B, CLASSES)),
]
WEIRD_TRICK_BYTES = (
    gathered((B, POOL5 * POOL5 * C5)) + 2 * gathered((B, FC))
    + gathered((B, CLASSES)) + scattered((B // N, POOL5 * POOL5 * C5))
    + 2 * scattered((B, FC // 2)) + B * CLASSES * F32)


@pytest.fixture(scope='module')
def result():
  config = two_gpu.get_config('synthetic')
  return comm.report(config, ('data', 'two_column', 'weird_trick'),
                     jax.devices()[:N])


def crossing(rows, category):
  return [r for r in rows if r['category'] == category and r['group_size'] > 1]


def signature(rows):
  return collections.Counter((r['kind'], r['pass'], tuple(r['shape']))
                             for r in rows)


def check_gradients(rows, layers):
  """One all-reduce over both devices per parameter of `layers`."""
  grads = crossing(rows, 'gradient')
  assert sorted(r['param'] for r in grads) == sorted(
      f'{l}/{p}' for l in layers for p in PARAMS[l])
  for r in grads:
    layer, name = r['param'].split('/')
    assert r['kind'] == 'all-reduce' and r['pass'] == 'bwd'
    assert r['group_size'] == N and r['dtype'] == 'f32'
    assert math.prod(r['shape']) == PARAMS[layer][name]
    assert r['bytes_moved'] == PARAMS[layer][name] * F32  # 2(n-1)/n = 1


def check_metrics(rows, group):
  metrics = [r for r in rows if r['category'] == 'metric']
  assert len(metrics) == METRIC_SCALARS
  for r in metrics:
    assert (r['kind'], r['shape'], r['dtype']) == ('all-reduce', (), 'f32')
    assert r['group_size'] == group


def test_parameter_counts(result):
  p = result['params']
  assert p['by_layer'] == {l: sum(v.values()) for l, v in PARAMS.items()}
  assert (p['conv'], p['total']) == (CONV_PARAMS, ALL_PARAMS)
  assert p['bytes'] == ALL_PARAMS * F32
  assert p['conv_bytes'] == CONV_PARAMS * F32


def test_data_parallel_all_reduces_every_gradient(result):
  s = result['schemes']['data']
  assert s['mesh'] == {'data': N, 'model': 1}
  rows = s['collectives']
  assert not [r for r in rows if r['category'] in ('activation', 'other')]
  check_gradients(rows, PARAMS)
  check_metrics(rows, group=N)
  assert s['payload_bytes']['gradient'] == ALL_PARAMS * F32
  assert s['bytes_moved'] == {
      'activation': 0, 'gradient': ALL_PARAMS * F32,
      'metric': METRIC_SCALARS * F32, 'other': 0,
      'total': (ALL_PARAMS + METRIC_SCALARS) * F32}


def test_two_column_moves_only_activations(result):
  s = result['schemes']['two_column']
  assert s['mesh'] == {'data': 1, 'model': N}
  rows = s['collectives']
  acts = [r for r in rows if r['category'] == 'activation']
  assert signature(acts) == collections.Counter(TWO_COLUMN)
  for r in acts:
    assert r['group_size'] == N and r['dtype'] == 'f32'
    expected = (gathered(r['shape']) if r['kind'] == 'all-gather'
                else scattered(r['shape']))
    assert r['bytes_moved'] == expected
  # Gradients and metrics are summed over the 'data' axis, of size 1 here:
  # XLA may keep those all-reduces, but they stay on one device.
  assert all(r['group_size'] == 1 for r in rows
             if r['category'] in ('gradient', 'metric'))
  assert not [r for r in rows if r['category'] == 'other']
  assert s['bytes_moved'] == {'activation': TWO_COLUMN_BYTES, 'gradient': 0,
                              'metric': 0, 'other': 0,
                              'total': TWO_COLUMN_BYTES}


def test_weird_trick_moves_conv_gradients_and_fc_activations(result):
  s = result['schemes']['weird_trick']
  assert s['mesh'] == {'data': N, 'model': 1}
  rows = s['collectives']
  acts = [r for r in rows if r['category'] == 'activation']
  assert signature(acts) == collections.Counter(WEIRD_TRICK)
  assert all(r['group_size'] == N for r in acts)
  check_gradients(rows, CONV)
  check_metrics(rows, group=N)
  assert not [r for r in rows if r['category'] == 'other']
  assert s['payload_bytes']['gradient'] == CONV_PARAMS * F32
  assert s['bytes_moved'] == {
      'activation': WEIRD_TRICK_BYTES, 'gradient': CONV_PARAMS * F32,
      'metric': METRIC_SCALARS * F32, 'other': 0,
      'total': WEIRD_TRICK_BYTES + (CONV_PARAMS + METRIC_SCALARS) * F32}


def test_paper_checks(result):
  checks = {(c['scheme'], c['claim']): c for c in result['checks']}
  assert len(checks) == 4 and all(c['ok'] for c in checks.values())
  values = {c['scheme']: c['measured'] for c in result['checks']
            if c['unit'] == 'values'}
  assert values == {'data': ALL_PARAMS, 'weird_trick': CONV_PARAMS}
  totals = {n: s['bytes_moved']['total']
            for n, s in result['schemes'].items()}
  assert totals['weird_trick'] < totals['data']
  assert totals['two_column'] < totals['data']
  text = comm.format_report(result)
  assert 'FAILED' not in text and text.count('[ok]') == 4


def crossing_signature(rows):
  return collections.Counter(
      (r['kind'], r['pass'], tuple(r['shape']), r['dtype'], r['group_size'],
       r['bytes_moved'], r['category'], r['param'])
      for r in rows if r['group_size'] > 1)


def test_lowered_program_has_the_compiled_collectives_in_float32(result):
  config = two_gpu.get_config('synthetic')
  lowered = comm.report(config, ('data', 'two_column', 'weird_trick'),
                        jax.devices()[:N], hlo='lowered')
  for name, s in lowered['schemes'].items():
    compiled = result['schemes'][name]
    assert crossing_signature(s['collectives']) == crossing_signature(
        compiled['collectives']), name
    assert s['bytes_moved'] == compiled['bytes_moved'], name
    assert not compiled['notes'], name


def test_bfloat16_moves_activations_in_bfloat16():
  # The gathers carry the compute dtype: half the float32 bytes. The CPU
  # compiler runs them in float32, so this reads the program as JAX wrote it.
  config = two_gpu.get_config('synthetic')
  config.model.dtype = 'bfloat16'
  r = comm.report(config, ('data', 'two_column', 'weird_trick'),
                  jax.devices()[:N], hlo='lowered')
  two_column = r['schemes']['two_column']
  acts = [x for x in two_column['collectives']
          if x['category'] == 'activation']
  assert signature(acts) == collections.Counter(TWO_COLUMN)
  assert {x['dtype'] for x in acts} == {'bf16'}
  assert two_column['bytes_moved']['activation'] == TWO_COLUMN_BYTES // 2
  assert r['schemes']['weird_trick']['bytes_moved']['activation'] == (
      WEIRD_TRICK_BYTES // 2)
  # Every parameter's gradient is still summed once, whatever its dtype.
  assert r['schemes']['data']['payload_elements']['gradient'] == ALL_PARAMS
  assert r['schemes']['weird_trick']['payload_elements']['gradient'] == (
      CONV_PARAMS)
  assert all(c['ok'] for c in r['checks'])


# Compiled GPU programs spell collectives asynchronously and combine them;
# this module is what XLA prints for such a program, written by hand.
ASYNC_HLO = """\
HloModule jit_step, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%wrapped_all_to_all (a: f32[4,6]) -> f32[4,6] {
  %a = f32[4,6]{1,0} parameter(0)
  ROOT %all-to-all.1 = f32[4,6]{1,0} all-to-all(f32[4,6]{1,0} %a), channel_id=6, replica_groups={{0,1,2}}, dimensions={0}
}

ENTRY %main (p0: f32[8,128], p1: f32[64], p2: bf16[4,6], p3: f32[4,6]) -> f32[16,128] {
  %p0 = f32[8,128]{1,0} parameter(0)
  %p1 = f32[64]{0} parameter(1)
  %p2 = bf16[4,6]{1,0} parameter(2)
  %ag-start = (f32[8,128]{1,0}, f32[16,128]{1,0}) all-gather-start(f32[8,128]{1,0} %p0), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(step)/shard_map/jvp(AlexNet)/AlexNet._gather_columns/all_gather"}
  %rs-start = ((f32[64]{0}), f32[16]{0}) reduce-scatter-start(%p1), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %ar-start = (f32[64]{0}, bf16[4,6]{1,0}) all-reduce-start(%p1, %p2), channel_id=3, replica_groups={}, to_apply=%add, metadata={op_name="jit(step)/shard_map/(transpose(jvp(AlexNet))/AlexNet._conv/conv1/psum:jvp()/psum)"}
  %cp-start = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[], u32[]) collective-permute-start(%p0), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %a2a = f32[8,128]{1,0} all-to-all(%p0), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %p3 = f32[4,6]{1,0} parameter(3)
  %a2a-start = ((f32[4,6]{1,0}), f32[4,6]{1,0}) async-start(%p3), calls=%wrapped_all_to_all, metadata={op_name="jit(step)/shard_map/all_to_all"}
  %a2a-done = f32[4,6]{1,0} async-done(%a2a-start)
  %ag-done = f32[16,128]{1,0} all-gather-done((f32[8,128]{1,0}, f32[16,128]{1,0}) %ag-start)
  %rs-done = f32[16]{0} reduce-scatter-done(%rs-start)
  %ar-done = (f32[64]{0}, bf16[4,6]{1,0}) all-reduce-done(%ar-start)
  %gte0 = f32[64]{0} get-tuple-element(%ar-done), index=0, metadata={op_name="jit(step)/shard_map/transpose(jvp(AlexNet))/AlexNet._conv/conv1/psum"}
  %cp-done = f32[8,128]{1,0} collective-permute-done(%cp-start)
  ROOT %out = f32[16,128]{1,0} copy(%ag-done)
}
"""


def test_parser_reads_async_and_combined_collectives():
  rows = comm.parse_collectives(ASYNC_HLO, num_devices=8)
  got = [(c.kind, c.shape, c.dtype, c.group_size, c.payload_bytes,
          c.bytes_moved, c.is_async) for c in rows]
  assert got == [
      # A generic async-start: the collective inside the computation it
      # wraps (printed first), once.
      ('all-to-all', (4, 6), 'f32', 3, 96, 96 * 2 / 3, True),
      # Each start counted once, with its done's shape.
      ('all-gather', (16, 128), 'f32', 2, 8192, 4096, True),
      # Iota groups [2,4]: 2 groups of 4; the input is 4 x 16 floats.
      ('reduce-scatter', (16,), 'f32', 4, 64, 64 * 4 * 3 / 4, True),
      # 'replica_groups={}': all 8 devices; a tuple is one row per array.
      ('all-reduce', (64,), 'f32', 8, 256, 2 * 256 * 7 / 8, True),
      ('all-reduce', (4, 6), 'bf16', 8, 48, 2 * 48 * 7 / 8, True),
      ('collective-permute', (8, 128), 'f32', 2, 4096, 4096, True),
      ('all-to-all', (8, 128), 'f32', 4, 4096, 4096 * 3 / 4, False),
  ]
  sizes = {'conv1': {'kernel': 64, 'bias': 8}}
  kinds = [comm.classify(c, sizes) for c in rows]
  assert [k['category'] for k in kinds] == [
      'other', 'activation', 'other', 'gradient', 'metric', 'other', 'other']
  assert rows[0].op_name == 'jit(step)/shard_map/all_to_all'  # the wrapper's
  assert kinds[1]['pass'] == 'fwd' and kinds[3]['pass'] == 'bwd'
  assert kinds[3]['param'] == 'conv1/kernel'


def test_command_line_prints_a_table_per_scheme():
  env = command_env()
  proc = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.comm',
       '--config=configs/two_gpu.py:synthetic'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert '2 devices' in out.splitlines()[0]
  for name, mesh in (('data', 'data=2 x model=1'),
                     ('two_column', 'data=1 x model=2'),
                     ('weird_trick', 'data=2 x model=1')):
    section = out.split(f'== {name}: mesh {mesh}', 1)
    assert len(section) == 2, f'no table for {name}'
    header = section[1].splitlines()[1]
    assert header.split()[:4] == ['#', 'pass', 'kind', 'shape']
  # conv3's input in the two-column table: both columns' pool2 maps.
  two_column = out.split('== two_column:', 1)[1].split('== weird_trick:')[0]
  assert f'[{B},{POOL2},{POOL2},{C2}]' in two_column
  totals = out.split('Bytes moved per device per step', 1)[1]
  total_line = next(line for line in totals.splitlines()
                    if line.split()[:1] == ['total'])
  assert f'{TWO_COLUMN_BYTES:,}' in total_line
  assert out.count('[ok]') == 4 and 'FAILED' not in out
