"""The GPU suite: the project's train step against its PyTorch reference.

    python benchmarks/gpu.py

on a machine with one GPU (at most 7 minutes, compilation included) times

  * the project's step (`alexnet_jax.benchmark.measure`) for 'owt' and
    'original' at batch 128 and 512, in bfloat16 and float32, with conv1
    direct and by space-to-depth, and both networks also with the CPU's
    lowerings (conv1 tiled, split groups, strided pooling), so that what
    choosing them on a GPU would cost is measured;
  * the same two networks in PyTorch (benchmarks/torch_reference.py): eager
    float32, eager bfloat16 autocast and torch.compile bfloat16;

and writes the table, with the GPU, the driver and the library versions and
each JAX figure's ratio to the best PyTorch mode of its row, into
docs/benchmarks.md between the suite's markers (a re-run replaces it).
PyTorch runs first, in its own process, so that the two never share the
GPU's memory. Runs are ordered by importance, and a run that would start
after `--budget_s` is left out of the table and named as such.

    python benchmarks/gpu.py --tiny --out=/tmp/benchmarks.md

is the same suite in tiny sizes (quarter width, 67x67 inputs, batches 2 and
4, two timed steps, each model, dtype, conv1 and PyTorch mode once) on
whatever JAX and PyTorch find, a CPU included, so that the test suite runs
it; it never writes the committed document.
"""

import datetime
import gc
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

import common  # beside this file; puts the checkout's package on the path

DOC = common.DOC
BEGIN = '<!-- gpu-suite:begin -->'
END = '<!-- gpu-suite:end -->'

FLAGS = flags.FLAGS
flags.DEFINE_bool('tiny', False, 'Tiny sizes, on any device (the tests).')
flags.DEFINE_string('out', None, 'The document to write the table into '
                    '(default docs/benchmarks.md; required with --tiny).')
flags.DEFINE_integer('steps', 0, 'Steps timed per run (0: 30, tiny 2).')
flags.DEFINE_integer('budget_s', 420, 'No run starts after this many seconds.')

VARIANTS = ('owt', 'original')
BATCHES = (128, 512)
TORCH_MODES = ('eager-fp32', 'eager-bf16', 'compile-bf16')
# (dtype, conv1), most telling first: what a run would use, then what it
# is compared with.
JAX_MODES = (('bfloat16', 'space_to_depth'), ('bfloat16', 'direct'),
             ('float32', 'space_to_depth'), ('float32', 'direct'))
FULL = {
    'width': 1.0, 'image_size': 0, 'num_classes': 1000, 'steps': 30,
    'warmup': 5, 'compile_backend': 'inductor',
    # (variant, batch, dtype, conv1, lowerings of the grouped
    # convolutions and pooling: 'auto' or the CPU's) and (variant, mode,
    # batch).
    'jax': [(v, b, d, c, 'auto') for d, c in JAX_MODES for v in VARIANTS
            for b in BATCHES]
           + [(v, b, 'bfloat16', 'tiled', 'cpu') for v in VARIANTS
              for b in BATCHES],
    'torch': [(v, m, b) for v in VARIANTS for m in TORCH_MODES
              for b in BATCHES],
}
# Every model, batch, dtype, conv1 and PyTorch mode at least once, in as few
# compilations as that takes; torch.compile only captures the graph here
# (inductor's C++ code generation takes minutes on two CPU cores).
TINY = {
    'width': 0.25, 'image_size': 67, 'num_classes': 10, 'steps': 2,
    'warmup': 1, 'compile_backend': 'eager',
    'jax': [('owt', 2, 'bfloat16', 'space_to_depth', 'auto'),
            ('original', 4, 'float32', 'direct', 'auto')],
    'torch': [('owt', 'eager-fp32', 2), ('owt', 'compile-bf16', 2),
              ('original', 'eager-bf16', 4)],
}


def _run_torch(sizes: dict, steps: int, timeout: float) -> dict:
  return common.run_torch(
      sizes['torch'], steps=steps, warmup=sizes['warmup'],
      width=sizes['width'], image_size=sizes['image_size'],
      num_classes=sizes['num_classes'],
      compile_backend=sizes['compile_backend'], timeout=timeout)


def _jax_config(variant: str, dtype: str, conv1: str, lowerings: str,
                batch: int, sizes: dict):
  from configs import one_gpu
  config = one_gpu.get_config()
  config.dataset = 'synthetic'
  config.model.variant = variant
  config.model.dtype = dtype
  config.model.conv1 = conv1
  if lowerings == 'cpu':
    from alexnet_jax import models
    for field in ('grouped_conv', 'pooling'):
      config.model[field] = models.lowering(field, 'auto', 'cpu')
  config.model.width = sizes['width']
  config.model.num_classes = sizes['num_classes']
  config.image_size = sizes['image_size'] or -1
  config.batch_size = batch
  return config


def _run_jax(sizes: dict, steps: int, deadline: float) -> tuple[list, list]:
  """(rows measured, runs left out for the time budget)."""
  from alexnet_jax import benchmark
  rows, skipped = [], []
  for variant, batch, dtype, conv1, lowerings in sizes['jax']:
    what = {'variant': variant, 'batch_size': batch, 'dtype': dtype,
            'conv1': conv1, 'lowerings': lowerings}
    if time.monotonic() > deadline:
      skipped.append(what)
      continue
    config = _jax_config(variant, dtype, conv1, lowerings, batch, sizes)
    row = benchmark.measure(config, steps=steps, warmup=sizes['warmup'])
    rows.append(row)
    print(f"jax {variant} {dtype} conv1 {conv1} grouped "
          f"{row['grouped_conv']} pooling {row['pooling']} batch {batch}: "
          f"{row['img_per_s']:,.1f} img/s, {row['step_ms']:.2f} ms/step, "
          f"compile {row['compile_s']:.1f} s", flush=True)
    gc.collect()
  return rows, skipped


def _gpu_and_driver() -> str:
  try:
    out = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
         '--format=csv,noheader'], capture_output=True, text=True,
        timeout=30, check=True).stdout.strip().splitlines()
    name, driver, memory = (s.strip() for s in out[0].split(','))
    return f'{name} ({memory}), driver {driver}'
  except (OSError, subprocess.SubprocessError, IndexError, ValueError):
    return f'no NVIDIA GPU ({platform.processor() or platform.machine()}, ' \
           f'{os.cpu_count()} CPU cores)'


def format_table(torch_info: dict, jax_rows: list, skipped: list,
                 sizes: dict, command: str, elapsed: float) -> str:
  torch_ips = {(r['variant'], r['batch_size'], r['mode']): r['img_per_s']
               for r in torch_info['rows']}
  # The main table has the platform's own lowerings of the grouped
  # convolutions and pooling; the others appear among every run below.
  from alexnet_jax import models
  jax_by = {(r['variant'], r['batch_size'], r['dtype'], r['conv1']): r
            for r in jax_rows if all(
                r[f] == models.lowering(f, 'auto', r['platform'])
                for f in ('grouped_conv', 'pooling'))}
  modes = sorted(JAX_MODES, key=lambda m: (m[0] != 'float32', m[1]))
  short = {'bfloat16': 'bf16', 'float32': 'fp32',
           'space_to_depth': 's2d', 'direct': 'direct'}
  lines = [
      f'Measured {datetime.date.today().isoformat()} with `{command}` in '
      f'{elapsed:.0f} s, compilation included.', '',
      f'- Device: {_gpu_and_driver()}',
      f'- Libraries: {common.versions(torch_info)}', '',
      'Training images/s, one synthetic batch resident on the device, full '
      'step (forward, loss, backward, SGD with momentum and weight decay); '
      'median of the timed steps. In brackets: the ratio to the best PyTorch '
      'mode of the row.', '',
      '| model | batch | ' + ' | '.join(f'PyTorch {m}' for m in TORCH_MODES)
      + ' | ' + ' | '.join(f'JAX {short[d]} conv1 {short[c]}'
                           for d, c in modes) + ' | best JAX MFU |',
      '|---|---|' + '---|' * (len(TORCH_MODES) + len(modes) + 1)]
  pairs = {(v, b) for v, b, *_ in sizes['jax']} | {
      (v, b) for v, _, b in sizes['torch']}
  for variant in VARIANTS:
    for batch in sorted(b for v, b in pairs if v == variant):
      peers = [torch_ips.get((variant, batch, m)) for m in TORCH_MODES]
      best_peer = max((p for p in peers if p), default=None)
      cells = [common.number(p) if p else 'not run' for p in peers]
      mfus = []
      for dtype, conv1 in modes:
        row = jax_by.get((variant, batch, dtype, conv1))
        if row is None:
          cells.append('not run')
          continue
        ratio = (f" ({row['img_per_s'] / best_peer:.2f}x)" if best_peer
                 else '')
        cells.append(common.number(row['img_per_s']) + ratio)
        if row['mfu'] is not None:
          mfus.append(row['mfu'])
      mfu = f'{100 * max(mfus):.1f}%' if mfus else 'null'
      lines.append(f'| {variant} | {batch} | ' + ' | '.join(cells)
                   + f' | {mfu} |')
  lines += ['', 'Every JAX run:', '',
            '| model | batch | dtype | conv1 | grouped convolutions | pooling '
            '| img/s | ms/step (fastest - slowest) | compile s | peak memory '
            'GiB | MFU |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in jax_rows:
    memory = ('-' if r['peak_memory_bytes'] is None
              else f"{r['peak_memory_bytes'] / 2**30:.2f}")
    mfu = '-' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(
        f"| {r['variant']} | {r['batch_size']} | {r['dtype']} | "
        f"{r['conv1']} | {r['grouped_conv']} | {r['pooling']} | "
        f"{common.number(r['img_per_s'])} | "
        f"{r['step_ms']:.2f} "
        f"({r['step_ms_min']:.2f} - {r['step_ms_max']:.2f}) | "
        f"{r['compile_s']:.1f} | {memory} | {mfu} |")
  if skipped:
    lines += ['', f'Not run (past the {FLAGS.budget_s} s budget): '
              + '; '.join(f"{s['variant']} batch {s['batch_size']} "
                          f"{s['dtype']} conv1 {s['conv1']} lowerings "
                          f"{s['lowerings']}" for s in skipped)
              + '.']
  if torch_info.get('error'):
    lines += ['', f"PyTorch stopped early: {torch_info['error']}"]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.monotonic()
  out = FLAGS.out or DOC
  if FLAGS.tiny and (FLAGS.out is None
                     or os.path.realpath(out) == os.path.realpath(DOC)):
    raise app.UsageError('--tiny writes tiny figures: give --out=PATH other '
                         'than docs/benchmarks.md')
  sizes = TINY if FLAGS.tiny else FULL
  steps = FLAGS.steps or sizes['steps']
  deadline = start + FLAGS.budget_s
  # PyTorch gets at most 40% of the budget; the project's own runs the rest.
  torch_info = _run_torch(sizes, steps, 0.4 * FLAGS.budget_s)
  jax_rows, skipped = _run_jax(sizes, steps, deadline)
  command = 'python benchmarks/gpu.py' + (' --tiny' if FLAGS.tiny else '')
  table = format_table(torch_info, jax_rows, skipped, sizes, command,
                       time.monotonic() - start)
  common.write_between_markers(out, BEGIN, END, table)
  print(table)
  print(f'written into {out}')


if __name__ == '__main__':
  app.run(main)
