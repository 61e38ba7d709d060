"""The GPU suite: the project's train step against its PyTorch reference.

    python benchmarks/gpu.py

on a machine with one GPU (at most 7 minutes, compilation included) times

  * the project's step (`alexnet_jax.benchmark.measure`) for 'owt' and
    'original' at batch 128 and 512, in bfloat16 and float32, with conv1
    direct and by space-to-depth;
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
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package and configs/ from this checkout, as `python -m` from the
# repository root has them.
sys.path.insert(0, REPO_ROOT)

DOC = os.path.join(REPO_ROOT, 'docs', 'benchmarks.md')
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
    # (variant, batch, dtype, conv1) and (variant, mode, batch).
    'jax': [(v, b, d, c) for d, c in JAX_MODES for v in VARIANTS
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
    'jax': [('owt', 2, 'bfloat16', 'space_to_depth'),
            ('original', 4, 'float32', 'direct')],
    'torch': [('owt', 'eager-fp32', 2), ('owt', 'compile-bf16', 2),
              ('original', 'eager-bf16', 4)],
}


def _run_torch(sizes: dict, steps: int, timeout: float) -> dict:
  """torch_reference.py's JSON object, from a process of its own."""
  with tempfile.TemporaryDirectory() as tmp:
    rows_path = os.path.join(tmp, 'rows.jsonl')
    command = [
        sys.executable, os.path.join(REPO_ROOT, 'benchmarks',
                                     'torch_reference.py'),
        '--runs=' + ','.join(f'{v}:{m}:{b}' for v, m, b in sizes['torch']),
        f'--compile_backend={sizes["compile_backend"]}', f'--steps={steps}',
        f'--warmup={sizes["warmup"]}',
        f'--width={sizes["width"]}', f'--image_size={sizes["image_size"]}',
        f'--num_classes={sizes["num_classes"]}', f'--rows={rows_path}']
    try:
      done = subprocess.run(command, capture_output=True, text=True,
                            timeout=max(timeout, 1), check=False)
      output = done.stdout + done.stderr
      failed = done.returncode != 0
    except subprocess.TimeoutExpired as e:
      partial = e.stdout or b''
      if isinstance(partial, bytes):
        partial = partial.decode(errors='replace')
      output = f'{partial}\ntimed out after {timeout:.0f} s'
      failed = True
    print(output if failed else done.stdout, flush=True)
    rows = []
    if os.path.exists(rows_path):
      with open(rows_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
  header = rows[0]['environment'] if rows else {}
  return {**header, 'rows': [r['row'] for r in rows],
          'error': output.strip().splitlines()[-1] if failed else None}


def _jax_config(variant: str, dtype: str, conv1: str, batch: int,
                sizes: dict):
  from configs import one_gpu
  config = one_gpu.get_config()
  config.dataset = 'synthetic'
  config.model.variant = variant
  config.model.dtype = dtype
  config.model.conv1 = conv1
  config.model.width = sizes['width']
  config.model.num_classes = sizes['num_classes']
  config.image_size = sizes['image_size'] or -1
  config.batch_size = batch
  return config


def _run_jax(sizes: dict, steps: int, deadline: float) -> tuple[list, list]:
  """(rows measured, runs left out for the time budget)."""
  from alexnet_jax import benchmark
  rows, skipped = [], []
  for variant, batch, dtype, conv1 in sizes['jax']:
    what = {'variant': variant, 'batch_size': batch, 'dtype': dtype,
            'conv1': conv1}
    if time.monotonic() > deadline:
      skipped.append(what)
      continue
    config = _jax_config(variant, dtype, conv1, batch, sizes)
    row = benchmark.measure(config, steps=steps, warmup=sizes['warmup'])
    rows.append(row)
    print(f"jax {variant} {dtype} conv1 {conv1} batch {batch}: "
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


def _versions(torch_info: dict) -> str:
  found = [f'Python {platform.python_version()}']
  for name in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin',
               'flax', 'optax', 'nvidia-cudnn-cu12', 'nvidia-cudnn-cu13'):
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  if torch_info.get('torch'):
    found.append(f"torch {torch_info['torch']}")
  if torch_info.get('cuda'):
    found.append(f"(CUDA {torch_info['cuda']}, cuDNN {torch_info['cudnn']})")
  return ', '.join(found)


def _number(value: float) -> str:
  return f'{value:,.0f}' if value >= 100 else f'{value:,.1f}'


def format_table(torch_info: dict, jax_rows: list, skipped: list,
                 sizes: dict, command: str, elapsed: float) -> str:
  torch_ips = {(r['variant'], r['batch_size'], r['mode']): r['img_per_s']
               for r in torch_info['rows']}
  jax_by = {(r['variant'], r['batch_size'], r['dtype'], r['conv1']): r
            for r in jax_rows}
  modes = sorted(JAX_MODES, key=lambda m: (m[0] != 'float32', m[1]))
  short = {'bfloat16': 'bf16', 'float32': 'fp32',
           'space_to_depth': 's2d', 'direct': 'direct'}
  lines = [
      f'Measured {datetime.date.today().isoformat()} with `{command}` in '
      f'{elapsed:.0f} s, compilation included.', '',
      f'- Device: {_gpu_and_driver()}',
      f'- Libraries: {_versions(torch_info)}', '',
      'Training images/s, one synthetic batch resident on the device, full '
      'step (forward, loss, backward, SGD with momentum and weight decay); '
      'median of the timed steps. In brackets: the ratio to the best PyTorch '
      'mode of the row.', '',
      '| model | batch | ' + ' | '.join(f'PyTorch {m}' for m in TORCH_MODES)
      + ' | ' + ' | '.join(f'JAX {short[d]} conv1 {short[c]}'
                           for d, c in modes) + ' | best JAX MFU |',
      '|---|---|' + '---|' * (len(TORCH_MODES) + len(modes) + 1)]
  pairs = {(v, b) for v, b, _, _ in sizes['jax']} | {
      (v, b) for v, _, b in sizes['torch']}
  for variant in VARIANTS:
    for batch in sorted(b for v, b in pairs if v == variant):
      peers = [torch_ips.get((variant, batch, m)) for m in TORCH_MODES]
      best_peer = max((p for p in peers if p), default=None)
      cells = [_number(p) if p else 'not run' for p in peers]
      mfus = []
      for dtype, conv1 in modes:
        row = jax_by.get((variant, batch, dtype, conv1))
        if row is None:
          cells.append('not run')
          continue
        ratio = (f" ({row['img_per_s'] / best_peer:.2f}x)" if best_peer
                 else '')
        cells.append(_number(row['img_per_s']) + ratio)
        if row['mfu'] is not None:
          mfus.append(row['mfu'])
      mfu = f'{100 * max(mfus):.1f}%' if mfus else 'null'
      lines.append(f'| {variant} | {batch} | ' + ' | '.join(cells)
                   + f' | {mfu} |')
  lines += ['', 'Every JAX run:', '',
            '| model | batch | dtype | conv1 | img/s | ms/step (fastest - '
            'slowest) | compile s | peak memory GiB | MFU |',
            '|---|---|---|---|---|---|---|---|---|']
  for r in jax_rows:
    memory = ('-' if r['peak_memory_bytes'] is None
              else f"{r['peak_memory_bytes'] / 2**30:.2f}")
    mfu = '-' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(
        f"| {r['variant']} | {r['batch_size']} | {r['dtype']} | "
        f"{r['conv1']} | {_number(r['img_per_s'])} | {r['step_ms']:.2f} "
        f"({r['step_ms_min']:.2f} - {r['step_ms_max']:.2f}) | "
        f"{r['compile_s']:.1f} | {memory} | {mfu} |")
  if skipped:
    lines += ['', f'Not run (past the {FLAGS.budget_s} s budget): '
              + '; '.join(f"{s['variant']} batch {s['batch_size']} "
                          f"{s['dtype']} conv1 {s['conv1']}" for s in skipped)
              + '.']
  if torch_info.get('error'):
    lines += ['', f"PyTorch stopped early: {torch_info['error']}"]
  return '\n'.join(lines)


def write_between_markers(path: str, table: str) -> None:
  """Replaces what lies between BEGIN and END in `path` (a new file holds
  only the markers and the table)."""
  text = f'{BEGIN}\n{END}\n'
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f'{path} has no {BEGIN} ... {END} markers to write '
                     'the table between')
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path + '.tmp', 'w') as f:
    f.write(f'{head}{BEGIN}\n{table}\n{END}{tail}')
  os.replace(path + '.tmp', path)


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
  write_between_markers(out, table)
  print(table)
  print(f'written into {out}')


if __name__ == '__main__':
  app.run(main)
