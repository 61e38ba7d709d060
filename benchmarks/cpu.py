"""The CPU step: the project's train step against PyTorch eager, one machine.

    python benchmarks/cpu.py

times, in one run on this machine's CPU cores,

  * the digits networks as the digits configs train them on one device
    (quarter width, 99x99 inputs, batch 64: configs/one_gpu.py:digits and
    configs/one_weird_trick.py:digits with parallelism 'none'), and the
    full-size networks at batch 16;
  * PyTorch eager float32 on the same networks (benchmarks/torch_reference.py,
    channels-last, in a process of its own);
  * the project's step (`alexnet_jax.benchmark.measure`) with XLA's own
    lowerings (one grouped convolution, reduce-window pooling) and as it
    trains on a CPU (`model.*='auto'`: split groups, strided pooling);

each `--repeats` times, alternating, keeping each one's best, and writes the
table into docs/benchmarks.md between the cpu-step markers. With `--profile`
it also traces a few steps of each digits network with JAX's profiler and
adds where the step's time goes, per class of operation, read from the
compiled program (`op_class`).

    python benchmarks/cpu.py --tiny --out=/tmp/benchmarks.md

is the same in tiny sizes, for the test suite; it never writes the committed
document.
"""

import collections
import datetime
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app, flags

import common  # beside this file; puts the checkout's package on the path

BEGIN = '<!-- cpu-step:begin -->'
END = '<!-- cpu-step:end -->'

FLAGS = flags.FLAGS
flags.DEFINE_bool('tiny', False, 'Tiny sizes (the tests).')
flags.DEFINE_string('out', None, 'The document to write the table into '
                    '(default docs/benchmarks.md; required with --tiny).')
flags.DEFINE_integer('repeats', 2, 'Rounds of every run, alternating.',
                     lower_bound=1)
flags.DEFINE_bool('profile', False, 'Also trace the digits networks and '
                  'give their step time per class of operation.')

# XLA's own lowering of every operation, against which 'auto' is measured.
XLA_LOWERINGS = {'conv1': 'direct', 'grouped_conv': 'grouped',
                 'pooling': 'reduce_window'}
# (name, variant, width, image size, classes, batch): the digits configs'
# networks, and the full-size ones with a small batch.
FULL = {
    'cases': [('digits', 'original', 0.25, 99, 10, 64),
              ('digits', 'owt', 0.25, 99, 10, 64),
              ('full size', 'original', 1.0, 227, 1000, 16),
              ('full size', 'owt', 1.0, 224, 1000, 16)],
    'steps': 12, 'warmup': 3, 'profile_steps': 5}
# The network with every lowering that differs (groups, LRN, pooling).
TINY = {
    'cases': [('tiny', 'original', 0.25, 67, 10, 4)],
    'steps': 2, 'warmup': 1, 'profile_steps': 1}


def _config(variant, width, image_size, classes, batch, lowerings):
  from configs import one_gpu
  config = one_gpu.get_config('digits')
  config.model.variant = variant
  config.model.width = width
  config.image_size = image_size
  config.model.num_classes = classes
  config.batch_size = batch
  for field, mode in lowerings.items():
    config.model[field] = mode
  return config


def _auto():
  from alexnet_jax import models
  return {field: 'auto' for field in models.LOWERINGS}


# What JAX names an operation after (its op_name's path: the layer's method
# and name, the function it came from), in the order tried.
OP_CLASSES = (
    (r'_conv/|Conv|conv_general_dilated', 'convolutions'),
    (r'_dense/|dot_general', 'fully connected'),
    (r'_pool|strided_max_pool|select_and_scatter', 'max-pooling'),
    (r'lrn', 'LRN'),
    (r'device_augment', 'input augmentation (reflection, lighting, mean)'),
    (r'relu|tanh', 'activations'),
    (r'Dropout|threefry|random', 'dropout and its random bits'),
    (r'softmax|take_along_axis|top_k|log|psum', 'loss, metrics, sums'),
    (r'opt_state|sgd|apply_updates|inject|decayed|momentum',
     'optimizer update'),
)


def op_class(op_name: str) -> str:
  """The class of operation an HLO instruction belongs to, from the name
  JAX gave it (its op_name metadata), forward or backward."""
  for pattern, kind in OP_CLASSES:
    if re.search(pattern, op_name):
      if 'AlexNet' in op_name:
        kind += ' (backward)' if 'transpose(' in op_name else ' (forward)'
      return kind
  return 'other'


def _instruction_classes(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> op_class, for every instruction of the compiled
  program; a fusion takes the class of the most common among its fused
  instructions when it has no name of its own."""
  computations, current = collections.defaultdict(list), None
  names, calls = {}, {}
  # Opcodes of the instructions XLA made without a name: the convolutions
  # and matmuls of its own gradient rewrites (window-dilated weight
  # gradients) among them.
  unnamed = collections.defaultdict(set)
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      current = header.group(1)
      continue
    instruction = re.match(r'^\s+(?:ROOT )?%?([\w.\-]+) = ', line)
    if not instruction:
      continue
    name = instruction.group(1)
    op_name = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r'calls=%?([\w.\-]+)', line)
    if op_name:
      names[name] = op_name.group(1)
      computations[current].append(op_name.group(1))
    else:
      opcode = re.search(r' = \S+ ([\w\-]+)\(', line)
      if opcode:
        unnamed[current].add(opcode.group(1))
    if called:
      calls[name] = called.group(1)
  classes = {}
  for name in set(names) | set(calls):
    if name in names:
      classes[name] = op_class(names[name])
      continue
    inner = collections.Counter(op_class(n) for n in computations[calls[name]])
    if inner:
      classes[name] = inner.most_common(1)[0][0]
    elif 'convolution' in unnamed[calls[name]]:
      classes[name] = 'convolutions (backward)'
    elif 'dot' in unnamed[calls[name]]:
      classes[name] = 'fully connected (backward)'
    elif re.search(r'transpose|copy', name):
      # XLA's own: the layouts its convolution kernels want, mostly the
      # input and the gradients transposed for the weight gradients.
      classes[name] = 'layout transposes and copies (XLA)'
    else:
      classes[name] = 'other'
  return classes


def profile(config, steps: int) -> dict[str, float]:
  """ms per step of each class of operation, from a trace of `steps`
  steps."""
  import jax
  from alexnet_jax import benchmark
  built = benchmark.compiled_step(config)
  classes = _instruction_classes(built['step'].as_text())
  state = built['state']
  step = lambda state: built['step'](state, built['batch'], built['lr'],
                                     built['rng'], built['constants'])[0]
  for _ in range(2):
    state = step(state)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state = step(state)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                        recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_class = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in classes:
      per_class[classes[event['name']]] += event.get('dur', 0) / 1e3 / steps
  return dict(per_class)


def _torch(sizes):
  """PyTorch's rows, one process per network size."""
  rows, errors, environment = [], [], {}
  by_size = collections.defaultdict(list)
  for _, variant, width, size, classes, batch in sizes['cases']:
    by_size[(width, size, classes)].append((variant, 'eager-fp32', batch))
  for (width, size, classes), runs in by_size.items():
    info = common.run_torch(runs, steps=sizes['steps'],
                            warmup=sizes['warmup'], width=width,
                            image_size=size, num_classes=classes,
                            timeout=900, device='cpu')
    rows += [{**r, 'width': width} for r in info['rows']]
    environment = {k: v for k, v in info.items() if k not in ('rows',
                                                              'error')}
    if info['error']:
      errors.append(info['error'])
  return rows, errors, environment


def _jax(sizes, lowerings):
  from alexnet_jax import benchmark
  rows = []
  for _, variant, width, size, classes, batch in sizes['cases']:
    config = _config(variant, width, size, classes, batch, lowerings)
    row = benchmark.measure(config, steps=sizes['steps'],
                            warmup=sizes['warmup'])
    rows.append({**row, 'width': width})
    print(f"jax {variant} width {width} batch {batch} "
          f"{'auto' if lowerings == _auto() else 'XLA lowerings'}: "
          f"{row['img_per_s']:,.1f} img/s", flush=True)
  return rows


def _median_ms(fn, *args, steps: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * sorted(times)[len(times) // 2]


def _conv1_shape(variant: str, width: float) -> tuple[int, int]:
  """(kernels, padding) of the network's conv1."""
  from alexnet_jax import models
  model = models.AlexNet(variant=variant, width=width)
  return model.scaled(model.arch.conv_features[0]), model.arch.conv1_padding


def conv1_times(sizes) -> dict:
  """(case name, variant, lowering) -> (forward ms, forward and weight
  gradient ms) of conv1 alone, at each case's batch, size and kernels."""
  import jax
  import jax.numpy as jnp
  from alexnet_jax import models
  times = {}
  for name, variant, width, size, _, batch in sizes['cases']:
    kernels, padding = _conv1_shape(variant, width)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    for mode in models.LOWERINGS['conv1'][0]:
      layer = models.conv1_module(mode, kernels, padding)
      params = layer.init(jax.random.key(1), images)
      forward = jax.jit(layer.apply)
      # The images are data: only the parameters' gradient, as in training.
      train = jax.jit(jax.grad(lambda p, x, layer=layer: jnp.sum(
          layer.apply(p, x) ** 2)))
      times[name, variant, mode] = (
          _median_ms(forward, params, images, steps=sizes['steps']),
          _median_ms(train, params, images, steps=sizes['steps']))
      print(f'conv1 {variant} {name} {mode}: forward '
            f'{times[name, variant, mode][0]:.2f} ms, with the weight '
            f'gradient {times[name, variant, mode][1]:.2f} ms', flush=True)
  return times


def _best(rounds):
  """Per (variant, width): the row with the most images/s over the rounds."""
  best = {}
  for rows in rounds:
    for row in rows:
      key = (row['variant'], row['width'])
      if key not in best or row['img_per_s'] > best[key]['img_per_s']:
        best[key] = row
  return best


def format_table(sizes, torch_best, xla_best, auto_best, errors,
                 environment, profiles, elapsed, conv1=None) -> str:
  import jax
  command = 'python benchmarks/cpu.py' + (' --tiny' if FLAGS.tiny else '') + (
      ' --profile' if FLAGS.profile else '')
  lines = [
      f'Measured {datetime.date.today().isoformat()} with `{command}` in '
      f'{elapsed:.0f} s: {os.cpu_count()} CPU cores, '
      f'{common.versions(environment)}; best of {FLAGS.repeats} alternating '
      'rounds of each run, median of its timed steps.', '',
      'Training images/s (forward, loss, backward, SGD with momentum and '
      'weight decay), float32, one device:', '',
      '| network | batch | PyTorch eager | project, XLA\'s lowerings | '
      'project (`auto`: tiled conv1, split groups, strided pooling) | '
      'project / PyTorch |',
      '|---|---|---|---|---|---|']
  for name, variant, width, size, _, batch in sizes['cases']:
    peer = torch_best.get((variant, width))
    xla, auto = xla_best.get((variant, width)), auto_best.get((variant, width))
    cells = [common.number(r['img_per_s']) if r else 'not run'
             for r in (peer, xla, auto)]
    ratio = (f"{auto['img_per_s'] / peer['img_per_s']:.2f}x"
             if peer and auto else '-')
    lines.append(f'| {variant}, {name} ({width:g} width, {size}x{size}) | '
                 f'{batch} | ' + ' | '.join(cells) + f' | {ratio} |')
  if errors:
    lines += ['', 'PyTorch stopped early: ' + '; '.join(errors)]
  if conv1:
    modes = sorted({mode for _, _, mode in conv1})
    lines += ['', 'conv1 alone, ms: the forward pass / the forward pass and '
              'the weight gradient (median of its timed runs, one round):',
              '', '| layer | batch, kernels | ' + ' | '.join(
                  f'`{m}`' for m in modes) + ' |',
              '|---|---|' + '---|' * len(modes)]
    for name, variant, width, size, _, batch in sizes['cases']:
      cells = [' / '.join(f'{ms:.1f}' for ms in conv1[name, variant, m])
               for m in modes]
      lines.append(f'| conv1 of {variant}, {name} ({size}x{size}) | {batch}, '
                   f'{_conv1_shape(variant, width)[0]} | '
                   + ' | '.join(cells) + ' |')
  for variant, per_class in profiles.items():
    total = sum(per_class.values())
    lines += ['', f'Where the {variant} step goes, `auto` lowerings (jax '
              f'{jax.__version__} profiler, ms per step):', '',
              '| operations | ms | share |', '|---|---|---|']
    for kind, ms in sorted(per_class.items(), key=lambda kv: -kv[1]):
      lines.append(f'| {kind} | {ms:.2f} | {100 * ms / total:.0f}% |')
    lines.append(f'| all | {total:.2f} | |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = FLAGS.out or common.DOC
  if FLAGS.tiny and (FLAGS.out is None
                     or os.path.realpath(out) == os.path.realpath(common.DOC)):
    raise app.UsageError('--tiny writes tiny figures: give --out=PATH other '
                         'than docs/benchmarks.md')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  start = time.monotonic()
  sizes = TINY if FLAGS.tiny else FULL
  torch_rounds, xla_rounds, auto_rounds = [], [], []
  errors, environment = [], {}
  for _ in range(FLAGS.repeats):
    rows, round_errors, environment = _torch(sizes)
    torch_rounds.append(rows)
    errors += round_errors
    xla_rounds.append(_jax(sizes, XLA_LOWERINGS))
    auto_rounds.append(_jax(sizes, _auto()))
  conv1 = conv1_times(sizes)
  profiles = {}
  if FLAGS.profile:
    for name, variant, width, size, classes, batch in sizes['cases'][:2]:
      profiles[f'{variant} ({name}, batch {batch})'] = profile(
          _config(variant, width, size, classes, batch, _auto()),
          sizes['profile_steps'])
  table = format_table(sizes, _best(torch_rounds), _best(xla_rounds),
                       _best(auto_rounds), errors, environment, profiles,
                       time.monotonic() - start, conv1)
  common.write_between_markers(out, BEGIN, END, table)
  print(table)
  print(f'written into {out}')


if __name__ == '__main__':
  app.run(main)
