"""The ablations: each pair differs in exactly the field it names, every config
is valid, and the table computes epochs to 25% training error as Figure 1
measures it."""

import pytest

from alexnet_jax import ablations, validation
from configs import ablation, two_gpu

# The fields that tell the members of each pair apart, and nothing else.
CHANGED = {
    'relu_tanh': {'model.activation'},
    'lrn': {'model.lrn'},
    'pooling': {'model.pool_window'},
    'columns': {'model.variant', 'parallelism', 'num_devices', 'cpu_devices'},
}
FORMS = ('', ',digits', ',synthetic')


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('name', ablation.NAMES)
def test_every_config_is_valid(name, form):
  validation.check_config(ablation.get_config(name + form))


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('pair', ablation.PAIRS)
def test_pair_differs_in_exactly_its_fields(pair, form):
  first, second = (ablations.flat_config(n + form)
                   for n in ablation.PAIRS[pair])
  assert first.keys() == second.keys()
  assert {k for k in first if first[k] != second[k]} == CHANGED[pair]


def test_paper_choices_are_two_gpu_and_share_one_run():
  base = two_gpu.get_config().to_dict()
  for name in ('relu', 'lrn', 'overlapping_pool', 'two_columns'):
    assert ablation.get_config(name).to_dict() == base
    assert ablations.run_name(name, 'digits') == 'relu'
  for name in ('tanh', 'no_lrn', 'non_overlapping_pool', 'one_column'):
    assert ablations.run_name(name, 'digits') == name


def test_digits_form_is_two_gpu_digits_logging_often():
  expected = two_gpu.get_config('digits')
  # 1,497 training digits in batches of 64 make 23 steps an epoch: a record
  # every 2 steps resolves 25% training error to a tenth of an epoch.
  expected.log_every_steps = 2
  assert ablation.get_config('relu,digits').to_dict() == expected.to_dict()
  assert ablation.get_config('relu').log_every_steps == 50


@pytest.mark.parametrize('arg', ['gelu', 'gelu,digits', '', None])
def test_unknown_name_lists_the_names(arg):
  with pytest.raises(ValueError, match='relu, tanh, lrn, no_lrn') as e:
    ablation.get_config(arg)
  assert 'one_column' in str(e.value)


def test_command_is_the_one_the_table_prints():
  argv, rundir = ablations.command('tanh', 'digits', '/w', 0, 1)
  assert ' '.join(argv) == ('python -m alexnet_jax.main --config=configs/'
                            'ablation.py:tanh,digits --workdir=/w/tanh')
  argv, rundir = ablations.command('tanh', 'digits', '/w', 2, 3)
  assert argv[-2:] == ['--workdir=/w/tanh-seed2', '--config.seed=2']
  assert rundir == '/w/tanh-seed2'


def _records(train_errors, final_error=(0.02, 0.0), per_epoch=4):
  """Train records logged `per_epoch` times an epoch, then one evaluation."""
  records = [{'step': i + 1, 'epoch': (i + 1) / per_epoch, 'split': 'train',
              'top1': 1 - e, 'top5': 1.0} for i, e in enumerate(train_errors)]
  epochs = len(train_errors) / per_epoch
  records.append({'step': len(train_errors), 'epoch': epochs, 'split': 'eval',
                  'top1': 1 - final_error[0], 'top5': 1 - final_error[1]})
  return records


def _run(name, seed, records, wall_s=60.0):
  return ablations.Run(name, seed, f'cmd {name} {seed}', records, wall_s)


def test_epochs_to_error_takes_the_first_record_at_or_below_25():
  records = _records([0.9, 0.5, 0.26, 0.25, 0.1, 0.3])
  assert ablations.epochs_to_error(records) == 1.0
  assert ablations.epochs_to_error(_records([0.9, 0.3])) is None
  # Evaluation records do not count, however low their error.
  assert ablations.epochs_to_error(_records([0.9, 0.3], (0.0, 0.0))) is None


def test_ratio_and_not_reached():
  relu = [_run('relu', s, _records([0.5, 0.2] + [0.1] * 6)) for s in (0, 1)]
  tanh = [_run('tanh', s, _records([0.5] * 5 + [0.2] * 3)) for s in (0, 1)]
  assert ablations.epochs_ratio(tanh, relu) == '3.00'   # 1.5 / 0.5 epochs
  never = [_run('tanh', s, _records([0.5] * 8)) for s in (0, 1)]
  assert ablations.epochs_ratio(never, relu) == '> 4.00'  # 2 epochs / 0.5
  assert ablations.epochs_ratio(tanh, never).startswith('undefined')


def _table(runs_by_name, pairs):
  return ablations.markdown('digits', pairs, runs_by_name, machine='2 CPUs',
                            date='2012-12-03')


def test_table_rows_differences_and_shared_runs():
  base = [_run('relu', s, _records([0.5, 0.2, 0.1, 0.1], (0.01 + s / 100,
                                                          0.0)))
          for s in (0, 1)]
  tanh = [_run('tanh', s, _records([0.5, 0.4, 0.3, 0.2], (0.03, 0.01)),
               wall_s=90.0) for s in (0, 1)]
  no_lrn = [_run('no_lrn', s, _records([0.5, 0.5, 0.5, 0.5], (0.02, 0.0)))
            for s in (0, 1)]
  text = _table({'relu': base, 'tanh': tanh, 'lrn': base, 'no_lrn': no_lrn},
                ['relu_tanh', 'lrn'])
  rows = [line for line in text.splitlines() if line.startswith('| ')]
  assert rows[1] == ('| relu_tanh | `relu` | digits | 1.50 ± 0.71 | '
                     '0.00 ± 0.00 | 0.50 ± 0.00 | 1m00s |')
  assert rows[2] == ('| relu_tanh | `tanh` | digits | 3.00 ± 0.00 | '
                     '1.00 ± 0.00 | 1.00 ± 0.00 | 1m30s |')
  assert rows[3].startswith('| lrn | `lrn` (the `relu` run) | digits | 1.50')
  assert 'not reached in 1 epochs' in rows[4]
  # relu minus tanh: 1.5 - 3.0 points of top-1, 0 - 1 of top-5.
  assert rows[6].startswith('| relu_tanh | tanh/relu epochs ratio 2.00; '
                            '-1.50 ± 0.50 / -1.00 ± 0.00 |')
  assert rows[7].startswith('| lrn | -0.50 ± 0.50 / +0.00 ± 0.00 | '
                            '-1.4 / -1.2')
  assert '`relu`, `lrn` are the same config; it ran once, as `relu`' in text
  # Each run's command once, seed by seed.
  assert text.count('cmd relu 0') == 1
  commands = text.split('```sh\n')[1].split('\n```')[0].splitlines()
  assert commands == ['cmd relu 0', 'cmd tanh 0', 'cmd no_lrn 0',
                      'cmd relu 1', 'cmd tanh 1', 'cmd no_lrn 1']
  assert 'were not run here' in text and '2 CPUs' in text


def test_table_with_one_seed_has_no_spread():
  relu = [_run('relu', 0, _records([0.2], (0.01, 0.0)))]
  tanh = [_run('tanh', 0, _records([0.9] * 60, (0.05, 0.0)), wall_s=None)]
  text = _table({'relu': relu, 'tanh': tanh}, ['relu_tanh'])
  assert '± ' not in text.split('Differences')[0]
  assert 'not reached in 15 epochs | unknown |' in text
  assert 'tanh/relu epochs ratio > 60.00; -4.00 / +0.00' in text
