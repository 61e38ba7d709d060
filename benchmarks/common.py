"""What the benchmark suites share: PyTorch runs in a process of their own, the
library versions, and the tables they write into docs/benchmarks.md."""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package and configs/ from this checkout, as `python -m` from the
# repository root has them.
sys.path.insert(0, REPO_ROOT)

DOC = os.path.join(REPO_ROOT, 'docs', 'benchmarks.md')


def run_torch(runs, *, steps: int, warmup: int, width: float,
              image_size: int, num_classes: int, timeout: float,
              compile_backend: str = 'inductor',
              device: str | None = None) -> dict:
  """torch_reference.py's JSON object for `runs` ((variant, mode, batch)
  triples), from a process of its own; 'error' holds the last line of its
  output if it failed or ran past `timeout` seconds, and 'rows' what it
  measured until then."""
  with tempfile.TemporaryDirectory() as tmp:
    rows_path = os.path.join(tmp, 'rows.jsonl')
    command = [
        sys.executable, os.path.join(REPO_ROOT, 'benchmarks',
                                     'torch_reference.py'),
        '--runs=' + ','.join(f'{v}:{m}:{b}' for v, m, b in runs),
        f'--compile_backend={compile_backend}', f'--steps={steps}',
        f'--warmup={warmup}', f'--width={width}',
        f'--image_size={image_size}', f'--num_classes={num_classes}',
        f'--rows={rows_path}'] + ([f'--device={device}'] if device else [])
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


def versions(torch_info: dict) -> str:
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


def number(value: float) -> str:
  return f'{value:,.0f}' if value >= 100 else f'{value:,.1f}'


def write_between_markers(path: str, begin: str, end: str,
                          table: str) -> None:
  """Replaces what lies between `begin` and `end` in `path` (a new file
  holds only the markers and the table)."""
  text = f'{begin}\n{end}\n'
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if begin not in text or end not in text:
    raise ValueError(f'{path} has no {begin} ... {end} markers to write '
                     'the table between')
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path + '.tmp', 'w') as f:
    f.write(f'{head}{begin}\n{table}\n{end}{tail}')
  os.replace(path + '.tmp', path)
