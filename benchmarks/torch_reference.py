"""The two AlexNets in PyTorch, for timing the same training step there.

    python benchmarks/torch_reference.py --variants=owt,original \\
        --batches=128,512

Benchmark only: training never imports PyTorch. The networks are this
project's `owt` and `original` (`alexnet_jax.models`), layer for layer: the
same widths, paddings, groups, per-column LRN with the paper's constants and
dropout sites, in channels-last layout. The step is the project's: forward,
cross-entropy, backward, SGD with momentum 0.9 and weight decay 5e-4, on one
synthetic batch resident on the device. Modes:

  eager-fp32    eager, float32 (TF32 matmuls and convolutions allowed, as
                XLA's default precision allows on the same GPUs)
  eager-bf16    eager under bfloat16 autocast
  compile-bf16  torch.compile of the whole step, under bfloat16 autocast

Each step is timed from the end of the previous one (CUDA events on a GPU);
prints one line per run and, last, one JSON object with every row. `--width`,
`--image_size` and `--num_classes` shrink the networks so that the same file
runs on a CPU inside the test suite (there with `--compile_backend=eager`:
inductor's C++ code generation takes minutes on two cores).
"""

import json
import statistics
import time

import torch
from absl import app, flags
from torch import nn

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['owt', 'original'], "'owt' and/or 'original'.")
flags.DEFINE_list('modes', ['eager-fp32', 'eager-bf16', 'compile-bf16'],
                  'Modes to time.')
flags.DEFINE_list('batches', ['128', '512'], 'Batch sizes.')
flags.DEFINE_list('runs', [], 'VARIANT:MODE:BATCH triples to time instead of '
                  'every combination of --variants, --modes and --batches.')
flags.DEFINE_string('compile_backend', 'inductor', "torch.compile's backend "
                    "('eager' captures the graph and runs it as it is).")
flags.DEFINE_integer('steps', 20, 'Steps timed.', lower_bound=1)
flags.DEFINE_integer('warmup', 5, 'Steps run first, untimed (compilation, '
                     'cuDNN autotuning).', lower_bound=1)
flags.DEFINE_float('width', 1.0, 'Multiplies every conv and FC width.')
flags.DEFINE_integer('image_size', 0, "Input size; 0: the variant's.")
flags.DEFINE_integer('num_classes', 1000, 'Size of fc8.')
flags.DEFINE_string('device', '', "'cuda' or 'cpu'; empty: cuda if present.")
flags.DEFINE_string('rows', None, 'Also append each row, as it is measured, '
                    'to this file as a JSON line (with the environment), so '
                    'that a run stopped early still leaves its rows.')

# (input size, conv widths, conv1 padding, columns, LRN, dropout before fc6/7)
VARIANTS = {
    'original': (227, (96, 256, 384, 384, 256), 0, 2, True, False),
    'owt': (224, (64, 192, 384, 256, 256), 2, 1, False, True),
}


class AlexNet(nn.Module):
  """`alexnet_jax.models.AlexNet(variant)`'s function, in NCHW."""

  def __init__(self, variant, width=1.0, image_size=None, num_classes=1000):
    super().__init__()
    size, convs, pad1, self.columns, self.use_lrn, self.before = (
        VARIANTS[variant])
    size = image_size or size
    scaled = lambda f: max(1, int(round(f * width)))
    c1, c2, c3, c4, c5 = (scaled(f) for f in convs)
    fc = scaled(4096)
    g = self.columns
    self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=pad1)
    self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, groups=g)
    self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
    self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, groups=g)
    self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, groups=g)
    # PyTorch divides alpha by the window: the paper's alpha=1e-4 is 5e-4.
    self.lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    self.pool = nn.MaxPool2d(3, 2)
    s = (size + 2 * pad1 - 11) // 4 + 1
    for _ in range(3):
      s = (s - 3) // 2 + 1
    self.fc6 = nn.Linear(s * s * c5, fc)
    self.fc7 = nn.Linear(fc, fc)
    self.fc8 = nn.Linear(fc, num_classes)
    self.dropout = nn.Dropout(0.5)

  def _norm(self, x):
    if not self.use_lrn:
      return x
    # The paper's columns normalise their own maps (section 3.3).
    return torch.cat([self.lrn(c) for c in x.chunk(self.columns, 1)], 1)

  def forward(self, x):
    x = self.pool(self._norm(torch.relu(self.conv1(x))))
    x = self.pool(self._norm(torch.relu(self.conv2(x))))
    x = torch.relu(self.conv3(x))
    x = torch.relu(self.conv4(x))
    x = self.pool(torch.relu(self.conv5(x)))
    x = torch.flatten(x, 1)
    if self.before:
      x = self.dropout(x)
    x = self.dropout(torch.relu(self.fc6(x)))
    x = torch.relu(self.fc7(x))
    if not self.before:
      x = self.dropout(x)
    return self.fc8(x)


def image_size(variant: str) -> int:
  return FLAGS.image_size or VARIANTS[variant][0]


def measure(variant: str, mode: str, batch: int, device: str) -> dict:
  torch.manual_seed(0)
  size = image_size(variant)
  model = AlexNet(variant, FLAGS.width, size, FLAGS.num_classes).to(device)
  model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                        weight_decay=5e-4)
  x = torch.randn(batch, 3, size, size, device=device).to(
      memory_format=torch.channels_last)
  y = torch.randint(0, FLAGS.num_classes, (batch,), device=device)
  loss_fn = nn.CrossEntropyLoss()
  bf16 = mode.endswith('bf16')

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  # Static shapes: one compiled graph per batch size, as XLA has.
  fn = step
  if mode.startswith('compile'):
    fn = torch.compile(step, backend=FLAGS.compile_backend, dynamic=False)
  cuda = device == 'cuda'
  start = time.perf_counter()
  fn()
  if cuda:
    torch.cuda.synchronize()
  first_s = time.perf_counter() - start
  for _ in range(FLAGS.warmup - 1):
    fn()
  if cuda:
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True)
              for _ in range(FLAGS.steps + 1)]
    events[0].record()
    for event in events[1:]:
      loss = fn()
      event.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
  else:
    times = []
    for _ in range(FLAGS.steps):
      t = time.perf_counter()
      loss = fn()
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return {'framework': 'torch', 'variant': variant, 'mode': mode,
          'batch_size': batch, 'image_size': size,
          'img_per_s': batch / step_s, 'step_ms': 1e3 * step_s,
          'step_ms_min': 1e3 * min(times), 'step_ms_max': 1e3 * max(times),
          'first_step_s': first_s, 'final_loss': float(loss)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  device = FLAGS.device or ('cuda' if torch.cuda.is_available() else 'cpu')
  if device == 'cuda':
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  environment = {
      'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
      'torch': torch.__version__, 'cuda': torch.version.cuda,
      'cudnn': torch.backends.cudnn.version() if device == 'cuda' else None}
  runs = [run.split(':') for run in FLAGS.runs] or [
      (variant, mode, batch) for variant in FLAGS.variants
      for mode in FLAGS.modes for batch in FLAGS.batches]
  rows = []
  for variant, mode, batch in runs:
    row = measure(variant, mode, int(batch), device)
    rows.append(row)
    print(f"torch {variant} {mode} batch {batch}: "
          f"{row['img_per_s']:,.1f} img/s, {row['step_ms']:.2f} ms/step "
          f"(first step {row['first_step_s']:.1f} s)", flush=True)
    if FLAGS.rows:
      with open(FLAGS.rows, 'a') as f:
        f.write(json.dumps({'environment': environment, 'row': row}) + '\n')
    if device == 'cuda':
      torch.cuda.empty_cache()
  print(json.dumps({**environment, 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
