"""Runs the notebooks top to bottom, as CI does, and checks their figures.

    python notebooks/execute.py [--in_place] [--out=DIR] [--timeout=S] [NOTEBOOK...]

Executes every notebook given (default: notebooks/*.ipynb) with nbclient in a
fresh `python3` kernel whose working directory is notebooks/, and fails, naming
the notebook and the cell, if any cell raises. Each notebook must then hold at
least one PNG figure in its outputs, at least as many as its metadata declares
(`metadata['alexnet_jax']['figures']`), and one in every cell that calls
`plt.show()`. The executed notebooks go to --out (default: a new temporary
directory) or, with --in_place, back into their own files; a notebook that
failed is then written to a temporary directory and its file left as it was.
Prints each notebook's wall time; exits with status 1 if any notebook failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import (CellExecutionError, CellTimeoutError,
                                 DeadKernelError)

HERE = os.path.dirname(os.path.abspath(__file__))
PNG = 'image/png'
ANSI = re.compile(r'\x1b\[[0-9;]*m')  # the colours of IPython's tracebacks
TRACEBACK_LINES = 25


def _first_line(cell) -> str:
  lines = [l for l in cell.source.splitlines() if l.strip()]
  return lines[0][:70] if lines else '(empty)'


def _images(cell) -> int:
  return sum(PNG in output.get('data', {}) for output in cell.get('outputs', [])
             if output.get('output_type') in ('display_data', 'execute_result'))


def _code_cells(nb):
  """(number of the code cell, counted from 1 as a reader counts them, cell)."""
  return [(n, cell) for n, cell in enumerate(
      (c for c in nb.cells if c.cell_type == 'code'), 1)]


def _error_cell(nb) -> str:
  """Which cell raised, its error, and the end of its traceback."""
  for n, cell in _code_cells(nb):
    for output in cell.get('outputs', []):
      if output.get('output_type') == 'error':
        trace = ANSI.sub('', '\n'.join(output.get('traceback', [])))
        tail = '\n'.join(trace.splitlines()[-TRACEBACK_LINES:])
        return (f'code cell {n} ({_first_line(cell)!r}): '
                f'{output.get("ename")}: {output.get("evalue")}\n{tail}')
  return 'a cell that left no error output'


def _running_cell(nb) -> str:
  """The first code cell left without an execution count."""
  for n, cell in _code_cells(nb):
    if cell.get('execution_count') is None:
      return f'code cell {n} ({_first_line(cell)!r})'
  return 'the last code cell'


def check_figures(nb) -> list[str]:
  """Problems with the figures of an executed notebook (none: [])."""
  problems = []
  total = 0
  for n, cell in _code_cells(nb):
    images = _images(cell)
    total += images
    if 'plt.show()' in cell.source and not images:
      problems.append(f'code cell {n} ({_first_line(cell)!r}) calls '
                      'plt.show() but has no image/png output')
  expected = max(1, nb.metadata.get('alexnet_jax', {}).get('figures', 1))
  if total < expected:
    problems.append(f'{total} image/png outputs, the notebook metadata '
                    f'declares {expected} figures')
  return problems


def execute(path: str, out_path: str, timeout: int) -> tuple[list[str], int]:
  """Runs one notebook and writes it to `out_path`; returns its problems and
  the number of PNG figures in its outputs."""
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb, timeout=timeout, kernel_name='python3',
      resources={'metadata': {'path': HERE}})
  try:
    client.execute()
  except CellTimeoutError:
    problems = [f'a cell ran longer than --timeout={timeout} s: '
                f'{_running_cell(nb)}']
  except CellExecutionError:
    problems = [f'error in {_error_cell(nb)}']
  except DeadKernelError as e:
    problems = [f'the kernel died (out of memory?) in {_running_cell(nb)}: '
                f'{e}']
  else:
    problems = check_figures(nb)
  # Written even when it failed: its outputs show where and why.
  nbformat.write(nb, out_path)
  return problems, sum(_images(cell) for _, cell in _code_cells(nb))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('notebooks', nargs='*', metavar='NOTEBOOK',
                      help='default: every notebooks/*.ipynb')
  where = parser.add_mutually_exclusive_group()
  where.add_argument('--in_place', action='store_true',
                     help='write each executed notebook back to its file')
  where.add_argument('--out', metavar='DIR',
                     help='directory for the executed notebooks (default: a '
                     'new temporary directory)')
  parser.add_argument('--timeout', type=int, default=1800, metavar='S',
                      help='seconds one cell may run (default: %(default)s)')
  args = parser.parse_args(argv)

  paths = args.notebooks or sorted(glob.glob(os.path.join(HERE, '*.ipynb')))
  if not paths:
    print(f'error: no notebooks in {HERE}', file=sys.stderr)
    return 1
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    print(f'error: no such notebook: {", ".join(missing)}', file=sys.stderr)
    return 1
  out_dir = None
  if not args.in_place:
    out_dir = args.out or tempfile.mkdtemp(prefix='alexnet_notebooks_')
    os.makedirs(out_dir, exist_ok=True)
  # An inherited MPLBACKEND (Agg on a headless CI machine) would replace the
  # kernel's inline backend, and the figures would never reach the outputs.
  os.environ.pop('MPLBACKEND', None)

  failures = 0
  for path in paths:
    name = os.path.basename(path)
    out_path = (os.path.join(tempfile.mkdtemp(prefix='alexnet_notebooks_'),
                             name) if args.in_place
                else os.path.join(out_dir, name))
    print(f'{name}: running', flush=True)
    start = time.time()
    problems, images = execute(path, out_path, args.timeout)
    seconds = time.time() - start
    if args.in_place and not problems:
      # Only a notebook that ran cleanly replaces the saved one.
      os.replace(out_path, path)
      os.rmdir(os.path.dirname(out_path))
      out_path = path
    if problems:
      failures += 1
      for problem in problems:
        print(f'{name}: FAILED: {problem}', file=sys.stderr, flush=True)
      print(f'{name}: failed after {seconds:.0f} s; executed copy: {out_path}',
            flush=True)
    else:
      print(f'{name}: ok in {seconds:.0f} s, {images} figures -> {out_path}',
            flush=True)
  if failures:
    print(f'{failures} of {len(paths)} notebooks failed', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
