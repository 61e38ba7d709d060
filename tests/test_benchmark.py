"""The benchmark command, its FLOP table and the GPU suite's tiny mode.

  * the layer table of training FLOPs is XLA's own count for the compiled
    train step of both full-size networks, within 10% (XLA leaves out the
    taps that fall on padding, about 7-8% of the table's count; the table
    leaves out biases, ReLUs, LRN, pooling and the update);
  * `python -m alexnet_jax.benchmark` runs on a CPU, ends with one JSON line
    with MFU null, and imports neither TensorFlow nor TFDS;
  * `python benchmarks/gpu.py --tiny` (PyTorch and JAX, every mode) fills in
    every cell of its table, and never writes the committed document.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from alexnet_jax import (benchmark, comm, flops, loader_benchmark, models,
                         validation)
from commands import REPO_ROOT, command_env
from configs import one_gpu

# Forward multiply-adds per image (PERFORMANCE.md's 714.2 M and 724.4 M).
FORWARD_MACS = {'owt': 714_188_480, 'original': 724_406_816}
# torchvision's AlexNet and the 2012 network (README.md's model table).
PARAMETERS = {'owt': 61_100_840, 'original': 60_965_224}


@pytest.mark.parametrize('variant', ['owt', 'original'])
def test_flop_table_matches_xla_cost_analysis(variant):
  config = one_gpu.get_config()
  config.model.variant = variant
  config.model.conv1 = 'direct'
  config.batch_size = 32
  model = models.from_config(config)
  size = validation.image_size(config)
  assert flops.forward_macs(model, size) == FORWARD_MACS[variant]
  table = flops.training_flops(model, size)
  # Three passes of two FLOPs per multiply-add, conv1's input gradient left
  # out: PERFORMANCE.md's 4.145 G for owt.
  conv1 = flops.layer_table(model, size)[0]
  assert table == 6 * FORWARD_MACS[variant] - 2 * conv1.macs

  # Lowered, not compiled: XLA's count of the HLO, at no compilation cost.
  lowered, _, _ = comm.lower_train_step(config, 'none', jax.devices()[:1])
  xla = lowered.cost_analysis()['flops'] / config.batch_size
  assert abs(xla - table) <= 0.10 * table, (xla, table)


def test_peak_table():
  assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.5
  assert benchmark.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.5
  assert benchmark.peak_tflops('NVIDIA H200', 'float32') == 494.5
  assert benchmark.peak_tflops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312.0
  assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'float64') is None
  assert benchmark.peak_tflops('cpu', 'float32') is None


# Runs the command as its own program would, then reports on stderr which of
# the modules the step does not need were imported.
RUN_AND_LIST_IMPORTS = '''
import json, runpy, sys
sys.argv = ['benchmark'] + sys.argv[1:]
try:
  runpy.run_module('alexnet_jax.benchmark', run_name='__main__')
finally:
  heavy = ('tensorflow', 'tensorflow_datasets', 'torch', 'grain')
  print(json.dumps(sorted({m.split('.')[0] for m in sys.modules
                           if m.split('.')[0] in heavy})), file=sys.stderr)
'''


def test_benchmark_command_on_cpu():
  done = subprocess.run(
      [sys.executable, '-c', RUN_AND_LIST_IMPORTS,
       '--config=configs/one_gpu.py:synthetic', '--steps=5'],
      cwd=REPO_ROOT, env=command_env(), capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stderr.strip().splitlines()[-1]) == []
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['platform'] == 'cpu'
  assert result['steps'] == 5
  assert result['img_per_s'] > 0
  assert result['step_ms'] == pytest.approx(1e3 * 16 / result['img_per_s'])
  assert result['step_ms_min'] <= result['step_ms'] <= result['step_ms_max']
  assert result['mfu'] is None
  assert result['peak_memory_bytes'] is None
  config = one_gpu.get_config('synthetic')
  assert result['flops_per_image'] == flops.training_flops(
      models.from_config(config), 99)
  # Synthetic images as float16 network inputs, an int32 label and the
  # per-example values every dataset ships (crop offset, reflection bit,
  # lighting colour).
  assert result['bytes_to_device_per_image'] == (
      99 * 99 * 3 * 2 + 4 + 2 * 4 + 1 + 3 * 4)
  assert result['input'] == 'synthetic'


def test_benchmark_fed_by_the_input_pipeline(tmp_path):
  # A store's pipeline alone, the step alone and the two together; uint8
  # patches, one byte per input value and 25 bytes of per-example values.
  config = one_gpu.get_config('synthetic')
  config.image_size = 67
  loader_benchmark.write_fake_store(str(tmp_path), 48, 2, num_classes=10)
  result = benchmark.measure(config, steps=2, warmup=0,
                             store_dir=str(tmp_path))
  assert result['input'] == 'pipeline'
  for key in ('loader_img_per_s', 'img_per_s', 'end_to_end_img_per_s'):
    assert result[key] > 0, key
  assert result['bytes_to_device_per_image'] == 67 * 67 * 3 + 4 + 8 + 1 + 12
  # Each stage of a training example timed alone, and the whole of it.
  stages = loader_benchmark.time_stages(str(tmp_path), image_size=67,
                                        decoder=None, images=16)
  assert list(stages) == ['record read', 'decode', 'draws', 'patch copy',
                          'whole example']
  assert all(us > 0 for us in stages.values()), stages


def test_input_peers_tiny(tmp_path):
  # The peers' benchmark end to end on a small store: interleaved rounds,
  # each pipeline's median, and the ratios. tf.data and PyTorch stay out
  # (their imports alone would take longer than the rest); DALI, which the
  # test requirements leave out, is reported as skipped.
  done = subprocess.run(
      [sys.executable, 'benchmarks/input_peers.py', f'--store={tmp_path}',
       '--make_fake=48', '--pipelines=decode,stages,project,forms,dali',
       '--threads=1,2',
       '--rounds=3', '--steps=2', '--warmup=1', '--batch_size=8',
       '--image_size=67'], cwd=REPO_ROOT, env=command_env(),
      capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  rows, samples = result['images_per_sec'], result['samples']
  # Only the JPEGs a timing uses are held in memory: (2 + 1) batches of 8.
  assert result['jpegs'] == 24
  stage_rows = ['decode + read', 'decode + read + draws',
                'decode + read + draws + copy']
  assert {'project', 'decode simplejpeg', 'decode pil', *stage_rows} <= set(
      rows)
  for name, by_count in rows.items():
    assert set(by_count) == {'1', '2'}, name
    for count, median in by_count.items():
      assert len(samples[name][count]) == 3
      assert median == sorted(samples[name][count])[1] > 0
  # The decoders alone are the floor; the stage rows are not decoders.
  assert {'decode simplejpeg', 'decode pil'} <= set(result['decoders'])
  assert not set(stage_rows) & set(result['decoders'])
  fastest = max(rows[k]['1'] for k in result['decoders'])
  ratio = result['ratios']['1']
  assert ratio['over_best_peer'] is None
  assert ratio['of_fastest_decoder'] == rows['project']['1'] / fastest
  assert ratio['stages_of_fastest_decoder'] == {
      name: rows[name]['1'] / fastest for name in stage_rows}
  assert 'of the fastest decoder alone' in done.stdout
  # The stored forms: the default decoder on each, none of them a decoder
  # row, each with its mean size (quality 75 the smallest) and its rate over
  # the form prepare writes.
  forms = ['prepare', 'standard Huffman', '4:4:4 chroma', '4:2:2 chroma',
           'quality 75', 'progressive', 'restart every row']
  assert set(result['form_bytes']) == set(forms), result['skipped']
  assert min(result['form_bytes'], key=result['form_bytes'].get) == (
      'quality 75')
  assert result['form_bytes']['prepare'] < result['form_bytes'][
      'standard Huffman']
  assert {f'form {f}' for f in forms} <= set(rows)
  assert not {f'form {f}' for f in forms} & set(result['decoders'])
  assert ratio['forms_over_prepare'] == {
      f: rows[f'form {f}']['1'] / rows['form prepare']['1'] for f in forms}
  assert 'the form prepare writes' in done.stdout
  # DALI is timed, its patches checked against the default decoder's, or
  # it is missing and said to be.
  if 'dali' in result['skipped']:
    assert 'dali' not in rows and result['dali_patches_differ'] is None
    assert 'dali: skipped' in done.stdout
  else:
    assert set(rows['dali']) == {'1', '2'}
    assert result['dali_patches_differ'] == 0


@pytest.mark.parametrize('command,fake', [
    (['benchmarks/input_peers.py', '--pipelines=decode'], '--make_fake=N'),
    (['-m', 'alexnet_jax.loader_benchmark'], '--make_fake=N'),
    (['-m', 'alexnet_jax.benchmark', '--config=configs/one_gpu.py:synthetic',
      '--input=pipeline'], 'leave out --store')])
def test_a_missing_store_says_how_to_make_one(tmp_path, command, fake):
  done = subprocess.run(
      [sys.executable, *command, f'--store={tmp_path / "none"}'],
      cwd=REPO_ROOT, env=command_env(), capture_output=True, text=True,
      timeout=120, check=False)
  assert done.returncode != 0
  assert 'alexnet_jax.prepare' in done.stderr, done.stderr[-2000:]
  assert fake in done.stderr, done.stderr[-2000:]
  assert 'Traceback' not in done.stderr, done.stderr[-2000:]


def test_added_stages_refuse_an_unknown_stage(tmp_path):
  loader_benchmark.write_fake_store(str(tmp_path), 8, 2)
  with pytest.raises(ValueError, match='resize'):
    loader_benchmark.time_added_stages(str(tmp_path), ('read', 'resize'),
                                       threads=1, image_size=67,
                                       decoder=None)


def test_torch_reference_has_the_project_models():
  sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
  try:
    import torch_reference
  finally:
    sys.path.pop(0)
  for variant, count in PARAMETERS.items():
    net = torch_reference.AlexNet(variant)
    assert sum(p.numel() for p in net.parameters()) == count, variant


def test_gpu_suite_tiny_mode(tmp_path):
  out = tmp_path / 'benchmarks.md'
  out.write_text('# Benchmarks\n\n<!-- gpu-suite:begin -->\nold\n'
                 '<!-- gpu-suite:end -->\n\nAfter.\n')
  doc = os.path.join(REPO_ROOT, 'docs', 'benchmarks.md')
  before = open(doc).read()
  done = subprocess.run(
      [sys.executable, 'benchmarks/gpu.py', '--tiny', f'--out={out}'],
      cwd=REPO_ROOT, env=command_env(), capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  text = out.read_text()
  assert 'old' not in text and text.endswith('After.\n')
  table = text.split('<!-- gpu-suite:begin -->')[1]
  rows = {tuple(cell.strip() for cell in line.split('|')[1:3]): line
          for line in table.splitlines()
          if line.startswith(('| owt |', '| original |'))
          and 'float32' not in line and 'bfloat16' not in line}
  runs = [line for line in table.splitlines()
          if line.startswith(('| owt |', '| original |'))
          and ('float32' in line or 'bfloat16' in line)]
  # Tiny mode: owt at batch 2 and the original network at batch 4, one JAX
  # run each, and every PyTorch mode once.
  assert set(rows) == {('owt', '2'), ('original', '4')}, table
  assert len(runs) == 2, table
  cells = [c.strip() for c in rows['owt', '2'].split('|')[3:-1]]
  eager_fp32, eager_bf16, compile_bf16, *jax_cells, mfu = cells
  assert eager_fp32 != 'not run' and compile_bf16 != 'not run', cells
  assert eager_bf16 == 'not run'
  assert sum(c != 'not run' for c in jax_cells) == 1, cells
  assert any(c.endswith('x)') for c in jax_cells), cells  # ratio to PyTorch
  assert mfu == 'null'
  assert 'not run' not in rows['original', '4'].split('|')[4], rows
  assert 'stopped early' not in table, table
  assert open(doc).read() == before

  refused = subprocess.run(
      [sys.executable, 'benchmarks/gpu.py', '--tiny'], cwd=REPO_ROOT,
      env=command_env(), capture_output=True, text=True, timeout=120,
      check=False)
  assert refused.returncode != 0
  assert '--out' in refused.stderr


def test_cpu_suite_tiny_mode(tmp_path):
  out = tmp_path / 'benchmarks.md'
  out.write_text('<!-- cpu-step:begin -->\nold\n<!-- cpu-step:end -->\n')
  doc = os.path.join(REPO_ROOT, 'docs', 'benchmarks.md')
  before = open(doc).read()
  done = subprocess.run(
      [sys.executable, 'benchmarks/cpu.py', '--tiny', f'--out={out}',
       '--profile', '--repeats=1'], cwd=REPO_ROOT, env=command_env(),
      capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  text = out.read_text()
  assert 'old' not in text and 'PyTorch stopped early' not in text, text
  (row,) = [line for line in text.splitlines()
            if line.startswith('| original, tiny')]
  peer, xla, auto, ratio = (c.strip() for c in row.split('|')[3:7])
  assert 'not run' not in (peer, xla, auto) and ratio.endswith('x'), row
  # conv1 alone in each of its lowerings, forward / with its weight gradient.
  (conv1,) = [line for line in text.splitlines()
              if line.startswith('| conv1 of original, tiny')]
  times = [[float(ms) for ms in c.split(' / ')]
           for c in conv1.split('|')[3:-1]]
  assert len(times) == 3 and all(
      len(t) == 2 and min(t) > 0 for t in times), conv1
  # The profile's classes add up to its total, and the convolutions and
  # pooling of both passes are among them.
  profile = text.split('Where the original')[1].splitlines()
  shares = {c[1].strip(): float(c[2]) for c in
            (line.split('|') for line in profile if line.startswith('| '))
            if c[2].strip() not in ('ms', '---')}
  total = shares.pop('all')
  assert sum(shares.values()) == pytest.approx(total, abs=0.05)
  assert {'convolutions (forward)', 'convolutions (backward)',
          'max-pooling (backward)', 'LRN (forward)'} <= set(shares), shares
  assert open(doc).read() == before
