"""Runs the paper's ablations (configs/ablation.py) and writes their table.

    python -m alexnet_jax.ablations --dataset=digits --workdir=/tmp/ablations --seeds=3 --out=docs/ablations.md

Every run is the command the table prints,
`python -m alexnet_jax.main --config=configs/ablation.py:NAME,digits
--workdir=DIR/NAME` (with several seeds `--workdir=DIR/NAME-seedS
--config.seed=S`), one after another. Members whose configs are identical
(relu, lrn, overlapping_pool and two_columns are all configs/two_gpu.py) share
one run, made under the first of their names. A run already finished in DIR is
reused and an unfinished one resumes, so the same command picks up where an
interrupted one stopped. `--only=relu_tanh,lrn` runs some pairs.

`markdown()` is a pure function of the metrics: the table of final validation
errors, epochs to 25% training error (the measure of the paper's Figure 1),
wall-clock and the paper's figures next to ours.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

from alexnet_jax import metrics_io
from configs import ablation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_ERROR = 0.25
# Stored next to a run's metrics.jsonl: the seconds its commands took.
WALL_CLOCK_FILE = 'ablation_wall_clock.json'

# What the paper reports for each pair (Krizhevsky et al. 2012), as the
# difference of the paper's choice minus the alternative, in points of error.
PAPER = {
    'relu_tanh': 'tanh took 6x the epochs of ReLU to reach 25% training error '
                 '(CIFAR-10, a four-layer CNN, Figure 1)',
    'lrn': '-1.4 / -1.2 (ImageNet); 11% vs 13% test error on CIFAR-10 '
           '(-2, a four-layer CNN)',
    'pooling': '-0.4 / -0.3 (ImageNet)',
    'columns': '-1.7 / -1.2 (ImageNet; one column has conv5 and the FC layers '
               'whole, so about as many parameters)',
}


@dataclasses.dataclass
class Run:
  """One training run: its command, its metrics.jsonl and its wall-clock."""
  name: str
  seed: int
  command: str
  records: list[dict]
  wall_s: float | None


def flat_config(arg: str) -> dict:
  """configs/ablation.py:ARG as {'model.lrn': 'off', ...}."""
  def flatten(d, prefix=''):
    for key, value in d.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield prefix + key, value
  return dict(flatten(ablation.get_config(arg).to_dict()))


def run_name(name: str, dataset: str) -> str:
  """The first name in ablation.NAMES whose config equals `name`'s."""
  config = flat_config(f'{name},{dataset}')
  return next(n for n in ablation.NAMES
              if flat_config(f'{n},{dataset}') == config)


def command(name: str, dataset: str, workdir: str, seed: int,
            seeds: int) -> tuple[list[str], str]:
  """The command line of one run, and its workdir."""
  rundir = os.path.join(workdir, name if seeds == 1 else f'{name}-seed{seed}')
  argv = ['python', '-m', 'alexnet_jax.main',
          f'--config=configs/ablation.py:{name},{dataset}',
          f'--workdir={rundir}']
  if seeds > 1:
    argv.append(f'--config.seed={seed}')
  return argv, rundir


def final_errors(records: list[dict]) -> tuple[float, float] | None:
  """Top-1 and top-5 validation error of the last evaluation."""
  evals = [r for r in records if r['split'] == 'eval']
  if not evals:
    return None
  return 1 - evals[-1]['top1'], 1 - evals[-1]['top5']


def epochs_to_error(records: list[dict],
                    target: float = TARGET_ERROR) -> float | None:
  """The epoch of the first training record at or below `target` error.

  A record is the mean over the steps since the previous one, so this is
  known to the logging interval."""
  return next((r['epoch'] for r in records
               if r['split'] == 'train' and 1 - r['top1'] <= target), None)


def trained_epochs(records: list[dict]) -> float:
  return max((r['epoch'] for r in records), default=0.0)


def _finished(records: list[dict], num_epochs: int) -> bool:
  return any(r['split'] == 'eval' and r['epoch'] >= num_epochs - 1e-9
             for r in records)


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
  mean = statistics.mean(values) * scale
  if len(values) == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}'


def _epochs_cell(runs: list[Run]) -> str:
  reached = [e for e in (epochs_to_error(r.records) for r in runs)
             if e is not None]
  longest = max(trained_epochs(r.records) for r in runs)
  if not reached:
    return f'not reached in {longest:g} epochs'
  cell = _mean_std(reached)
  if len(reached) < len(runs):
    cell += (f' ({len(reached)} of {len(runs)} seeds; the others not reached '
             f'in {longest:g} epochs)')
  return cell


def epochs_ratio(slow: list[Run], fast: list[Run]) -> str:
  """Mean epochs to 25% training error of `slow` over `fast`'s; a lower
  bound ('> x') when some `slow` run never got there."""
  fast_epochs = [epochs_to_error(r.records) for r in fast]
  if None in fast_epochs:
    return 'undefined (relu did not reach 25% in every seed)'
  slow_epochs = [epochs_to_error(r.records) for r in slow]
  bound = None in slow_epochs
  slow_epochs = [trained_epochs(r.records) if e is None else e
                 for r, e in zip(slow, slow_epochs)]
  ratio = statistics.mean(slow_epochs) / statistics.mean(fast_epochs)
  return f'> {ratio:.2f}' if bound else f'{ratio:.2f}'


def _difference(first: list[Run], second: list[Run], k: int) -> str:
  """Mean error of `first` minus `second`'s (top-1: k=0, top-5: k=1) in
  points, with the standard error of that difference over the seeds."""
  a = [final_errors(r.records)[k] * 100 for r in first]
  b = [final_errors(r.records)[k] * 100 for r in second]
  diff = statistics.mean(a) - statistics.mean(b)
  if len(a) < 2:
    return f'{diff:+.2f}'
  se = math.sqrt(statistics.variance(a) / len(a)
                 + statistics.variance(b) / len(b))
  return f'{diff:+.2f} ± {se:.2f}'


def _duration(runs: list[Run]) -> str:
  times = [r.wall_s for r in runs if r.wall_s is not None]
  if not times:
    return 'unknown'
  return metrics_io.format_duration(statistics.mean(times))


def markdown(dataset: str, pairs: list[str], runs: dict[str, list[Run]], *,
             machine: str, date: str) -> str:
  """The results table: `runs` maps every name of `pairs` to its runs, one
  per seed; names that share a run map to the same Run objects."""
  seeds = len(next(iter(runs.values())))
  lines = [
      f"# The paper's ablations, on {dataset}",
      '',
      f'Dataset: **{dataset}** for every number in the "ours" columns; the '
      "paper's numbers are from ImageNet unless marked. The ImageNet configs "
      f'(the same commands without `,{dataset}`) were not run here.',
      '',
      f'Machine: {machine}. Date: {date}. Seeds: {seeds} per setting'
      + (' (mean ± sample standard deviation over seeds).' if seeds > 1
         else '.'),
      '',
      '| pair | setting | dataset | val top-1 error (%) | val top-5 error (%) '
      '| epochs to 25% train error | wall-clock per run |',
      '|---|---|---|---|---|---|---|',
  ]
  for pair in pairs:
    for name in ablation.PAIRS[pair]:
      own = runs[name][0].name
      setting = f'`{name}`' + ('' if own == name else f' (the `{own}` run)')
      top1 = [final_errors(r.records)[0] for r in runs[name]]
      top5 = [final_errors(r.records)[1] for r in runs[name]]
      lines.append(
          f'| {pair} | {setting} | {dataset} | {_mean_std(top1, 100)} | '
          f'{_mean_std(top5, 100)} | {_epochs_cell(runs[name])} | '
          f'{_duration(runs[name])} |')

  lines += [
      '',
      'Epochs to 25% training error: the epoch of the first training record '
      '(the mean over the steps since the previous record, dropout on) at or '
      'below 25% error. Wall-clock: the whole command, start-up and '
      'compilation included' + (', mean over seeds.' if seeds > 1 else '.'),
      '',
      "Differences: the paper's choice (first of each pair) minus the "
      'alternative, in points of validation top-1 / top-5 error'
      + (' (± the standard error of the difference over seeds)'
         if seeds > 1 else '')
      + "; for relu_tanh the ratio of tanh's epochs to 25% training error to "
      "ReLU's.",
      '',
      f'| pair | ours ({dataset}) | paper |',
      '|---|---|---|',
  ]
  for pair in pairs:
    first, second = ablation.PAIRS[pair]
    ours = (f'{_difference(runs[first], runs[second], 0)} / '
            f'{_difference(runs[first], runs[second], 1)}')
    if pair == 'relu_tanh':
      ratio = epochs_ratio(runs[second], runs[first])
      ours = f'tanh/relu epochs ratio {ratio}; {ours}'
    lines.append(f'| {pair} | {ours} | {PAPER[pair]} |')

  shared = {}
  for name, name_runs in runs.items():
    shared.setdefault(name_runs[0].name, []).append(name)
  for own, names in shared.items():
    if len(names) > 1:
      lines += ['', f'{", ".join(f"`{n}`" for n in names)} are the same '
                f'config; it ran once, as `{own}`, and each of their rows '
                'shows that run.']

  ordered = {id(r): r for name_runs in runs.values() for r in name_runs}
  commands = sorted(ordered.values(), key=lambda r: r.seed)
  lines += ['', 'Commands, run one after another from the repository root:',
            '', '```sh', *(r.command for r in commands), '```', '']
  return '\n'.join(lines)


def _run(name: str, dataset: str, workdir: str, seed: int, seeds: int) -> Run:
  argv, rundir = command(name, dataset, workdir, seed, seeds)
  num_epochs = ablation.get_config(f'{name},{dataset}').num_epochs
  clock_path = os.path.join(rundir, WALL_CLOCK_FILE)
  wall_s = None
  if os.path.exists(clock_path):
    with open(clock_path) as f:
      wall_s = json.load(f)['seconds']
  if not _finished(metrics_io.read_metrics(rundir), num_epochs):
    print(' '.join(argv), flush=True)
    start = time.time()
    try:
      # sys.executable: the interpreter running this script, the table's
      # python.
      subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, check=True)
    finally:
      # Interrupted or not, a run's wall-clock is that of every command that
      # trained it.
      wall_s = (wall_s or 0.0) + time.time() - start
      if os.path.isdir(rundir):
        with open(clock_path, 'w') as f:
          json.dump({'seconds': wall_s}, f)
  else:
    print(f'reusing the finished run in {rundir}', flush=True)
  return Run(name, seed, ' '.join(argv), metrics_io.read_metrics(rundir),
             wall_s)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  pairs = FLAGS.only or list(ablation.PAIRS)
  unknown = [p for p in pairs if p not in ablation.PAIRS]
  if unknown:
    raise app.UsageError(f'Unknown pairs {unknown}: use some of '
                         f'{",".join(ablation.PAIRS)}')
  machine = (f'{os.cpu_count()} CPUs (os.cpu_count()), {platform.machine()} '
             f'{platform.system()}')
  names = [n for p in pairs for n in ablation.PAIRS[p]]
  owner = {n: run_name(n, FLAGS.dataset) for n in names}
  done = {}
  # Seed by seed, so that every setting has a run before any has two.
  for seed in range(FLAGS.seeds):
    for name in names:
      if (owner[name], seed) not in done:
        done[owner[name], seed] = _run(owner[name], FLAGS.dataset,
                                       FLAGS.workdir, seed, FLAGS.seeds)
  runs = {n: [done[owner[n], s] for s in range(FLAGS.seeds)] for n in names}
  text = markdown(FLAGS.dataset, pairs, runs, machine=machine,
                  date=datetime.date.today().isoformat())
  with open(FLAGS.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  flags.DEFINE_enum('dataset', 'digits', ['digits', 'synthetic'],
                    'The config argument after NAME: digits, or synthetic '
                    '(a smoke test).')
  flags.DEFINE_string('workdir', None, 'Every run gets a directory here.')
  flags.DEFINE_list('only', [], f'Pairs to run: some of '
                    f'{",".join(ablation.PAIRS)} (default: all).')
  flags.DEFINE_integer('seeds', 1, 'Runs per setting, with seeds 0..N-1.',
                       lower_bound=1)
  flags.DEFINE_string('out', None, 'The markdown table goes here.')
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
