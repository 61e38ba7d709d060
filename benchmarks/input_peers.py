"""The input pipeline against its peers, on the same JPEGs, in one run.

    python benchmarks/input_peers.py --store=/tmp/fake --make_fake=1536
    python benchmarks/input_peers.py --store=/data/store --threads=1,2,8

reads a prepared store's first training JPEGs, as many as a timing uses
(or first writes `--make_fake` synthetic ones, 256x256 quality 90, as
`alexnet_jax.loader_benchmark` does), and times, in images/s, at each count
of `--threads`:

  decode <name>  each decoder alone, from bytes in memory into uint8 arrays,
                 in that many threads: the floor of any pipeline
  decode + read, decode + read + draws, decode + read + draws + copy
                 ('stages') the loader's own loop reduced to decoding plus
                 reading the record, then also drawing the example's values,
                 then also cutting its patch into the batch, that many
                 threads (`loader_benchmark.time_added_stages`): what each
                 stage costs at that count, against the decoder alone
  project        this project's loader (`imagenet.PreparedDataset`): read,
                 decode, draw each example's crop, reflection and lighting,
                 cut the uint8 patch, batch (the rest runs on the accelerator)
  tf.data        decode_jpeg, mean image subtraction, random crop, random
                 reflection, batch; parallel map and prefetch, that many
                 threads
  torch          a PyTorch DataLoader with that many workers:
                 torchvision.io.decode_jpeg (Pillow where torchvision does
                 not load; requirements-peers.txt installs a torchvision
                 that does) and the same transforms
  dali           an NVIDIA DALI pipeline on the CPU, that many threads:
                 the same transforms, the patch decoded alone
                 (`decoders.image_slice`, libjpeg-turbo's partial decoding);
                 its patches are first checked against the default
                 decoder's

and, asked for by name (`--pipelines=forms`), not by default:

  form <name>    the default decoder alone, as the 'decode' rows, on the
                 same images encoded again in the form `prepare` writes
                 ('form prepare') and in others (FORMS: the standard
                 Huffman tables, chroma subsampling, quality, progressive,
                 restart markers), all from the same pixels: what another
                 stored form would change in decoding, beside each form's
                 mean JPEG size

Batches of `--batch_size` `--image_size` patches; `--steps` batches timed
after `--warmup` (`alexnet_jax.loader_benchmark`'s flags). Every pipeline
is timed `--rounds` times at each count, in rounds that time each of them
once (every other round in the reverse order), and the table gives each
one's median: a shared machine's speed drifts over seconds to minutes, and
interleaving lets every pipeline meet the same drifts. TensorFlow, PyTorch,
torchvision, DALI, OpenCV and simplejpeg are optional: a missing one is
reported and skipped. Prints one table and one JSON line (with every round's
figure). Throughput moves between runs and machines: compare the rows of
one run.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import time

import numpy as np
from absl import app, flags

from alexnet_jax import imagenet, loader_benchmark, prepare, store

# --store, --make_fake, --batch_size, --image_size, --steps and --warmup
# are alexnet_jax.loader_benchmark's flags.
FLAGS = flags.FLAGS
loader_benchmark.define_flags()  # --store, --make_fake, --steps, ...
flags.DEFINE_list('threads', ['1', '2'], 'Thread (worker) counts to time.')
PIPELINES = ('decode', 'stages', 'project', 'tf.data', 'torch', 'dali',
             'forms')
PEERS = ('tf.data', 'torch', 'dali')
# DALI's patches of this many JPEGs are checked against the default
# decoder's before the timings.
DALI_CHECKED = 128
flags.DEFINE_list('pipelines', list(PIPELINES[:-1]), 'What to time, of '
                  f'{", ".join(PIPELINES)}.')
flags.DEFINE_integer('rounds', 6, 'Times each pipeline is timed at each '
                     'count, interleaved with the others; the table gives '
                     'the median.')


# The 'stages' rows: decoding with one, two, then three of the loader's
# stages added, in its order.
STAGE_ROWS = {
    ' + '.join(('decode',) + loader_benchmark.ADDED_STAGES[:last]):
    loader_benchmark.ADDED_STAGES[:last]
    for last in range(1, len(loader_benchmark.ADDED_STAGES) + 1)}


def _decoders() -> dict:
  """name -> decode(jpeg bytes, out uint8 [H, W, 3]), for those installed."""
  found = {}
  for name in imagenet.DECODERS:
    try:
      imagenet.DECODE[name](_SAMPLE, np.empty((256, 256, 3), np.uint8))
    except ImportError:
      continue
    found[name] = imagenet.DECODE[name]
  if _torchvision_io() is not None:
    import torch

    def decode_torchvision(jpeg, out):
      data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
      out[...] = _torchvision_io().decode_jpeg(data).permute(1, 2, 0).numpy()

    found['torchvision'] = decode_torchvision
  return found


def _torchvision_io():
  """torchvision.io, or None where torchvision is missing or does not load
  (a CUDA build of it beside a CPU build of PyTorch raises RuntimeError)."""
  try:
    import torchvision.io
  except (ImportError, RuntimeError):
    return None
  return torchvision.io


# The stored forms that 'forms' times: each changes one of the options
# `prepare` writes with (prepare.JPEG_OPTIONS, at the store's quality), as
# Pillow's JPEG options. All keep the image's size, so the loader reads any
# of them as it is; 'standard Huffman' is the form of stores prepared before
# `optimize` was one of those options.
FORMS = {
    'prepare': {},
    'standard Huffman': {'optimize': False},
    '4:4:4 chroma': {'subsampling': '4:4:4'},
    '4:2:2 chroma': {'subsampling': '4:2:2'},
    'quality 75': {'quality': 75},
    'progressive': {'progressive': True},
    'restart every row': {'restart_marker_rows': 1},
}
_RESTART = b'\xff\xdd'  # the DRI marker (0xFF is escaped in coded data)


def encode_form(pixels: np.ndarray, quality: int, form: str) -> bytes:
  """The image, uint8 [H, W, 3], as the store would hold it in `form`."""
  from PIL import Image
  changes = dict(FORMS[form])
  jpeg = prepare.encode_jpeg(Image.fromarray(pixels),
                             changes.pop('quality', quality), **changes)
  if 'restart_marker_rows' in FORMS[form] and _RESTART not in jpeg:
    # An older Pillow takes the option without a word and writes none.
    raise ImportError('this Pillow writes no restart markers')
  return jpeg


_SAMPLE = loader_benchmark.encode_jpeg(
    loader_benchmark.natural_image(np.random.default_rng(0)))


def time_decoder(decode, jpegs: list[bytes], threads: int, images: int
                 ) -> float:
  """images/s of `decode` over `images` JPEGs (cycling through `jpegs`),
  in batches of 128 spread over `threads` threads."""
  shape = (256, 256, 3)

  def decode_chunk(start):
    out = np.empty(shape, np.uint8)
    for i in range(start, min(start + 128, images)):
      decode(jpegs[i % len(jpegs)], out)

  decode_chunk(0)
  starts = range(0, images, 128)
  begin = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(decode_chunk, starts))
  return images / (time.perf_counter() - begin)


def _time_batches(batches, steps: int, warmup: int, batch_size: int
                  ) -> float:
  for _ in range(warmup):
    next(batches)
  begin = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch_size / (time.perf_counter() - begin)


def time_tf_data(jpegs, mean_image, threads, size, batch_size, steps,
                 warmup) -> float:
  import tensorflow as tf
  mean = tf.constant(mean_image, tf.float32)

  def augment(jpeg):
    image = tf.cast(tf.io.decode_jpeg(jpeg, channels=3), tf.float32) - mean
    image = tf.image.random_crop(image, (size, size, 3))
    return tf.image.random_flip_left_right(image)

  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = (tf.data.Dataset.from_tensor_slices(jpegs).repeat()
        .shuffle(len(jpegs))
        .map(augment, num_parallel_calls=threads)
        .batch(batch_size, drop_remainder=True).prefetch(2)
        .with_options(options))
  return _time_batches(iter(ds), steps, warmup, batch_size)


class _TorchJpegs:
  """The JPEGs as a map-style PyTorch dataset, with the same transforms;
  decoded by torchvision.io or, where it does not load, by Pillow into a
  tensor (as torchvision's ImageFolder decodes)."""

  def __init__(self, jpegs, mean_image, size):
    import torch
    self.jpegs = [torch.frombuffer(bytearray(j), dtype=torch.uint8)
                  for j in jpegs]
    self.mean = torch.from_numpy(
        np.ascontiguousarray(mean_image.transpose(2, 0, 1), np.float32))
    self.size = size

  def __len__(self):
    return len(self.jpegs)

  def _decode(self, index):
    import torch
    io_ops = _torchvision_io()
    if io_ops is not None:
      return io_ops.decode_jpeg(self.jpegs[index])
    from PIL import Image
    with Image.open(io.BytesIO(self.jpegs[index].numpy().tobytes())) as image:
      pixels = np.asarray(image.convert('RGB'))
    return torch.from_numpy(pixels).permute(2, 0, 1)

  def __getitem__(self, index):
    import torch
    image = self._decode(index).float() - self.mean
    top, left = (int(v) for v in torch.randint(
        0, image.shape[1] - self.size + 1, (2,)))
    image = image[:, top:top + self.size, left:left + self.size]
    if torch.rand(()) < 0.5:
      image = image.flip(-1)
    return image


def _dali_slice(jpeg, anchor, size: int):
  """DALI's partial decoding of the size x size patch at `anchor` ([x, y],
  DALI's order), uint8, on the CPU."""
  from nvidia.dali import fn, types
  return fn.decoders.image_slice(
      jpeg, anchor, np.array([size, size], np.float32), device='cpu',
      output_type=types.RGB, normalized_anchor=False, normalized_shape=False)


def _dali_pipeline(source, outputs: int, threads: int, batch_size: int,
                   graph):
  """A built CPU-only DALI pipeline of `graph` over the external `source`
  (batch_info -> `outputs` lists of arrays)."""
  from nvidia.dali import fn, pipeline_def

  @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None,
                prefetch_queue_depth=2, seed=0)
  def pipeline():
    given = fn.external_source(source=source, num_outputs=outputs,
                               batch=True, batch_info=True)
    return graph(*given)

  built = pipeline()
  built.build()
  return built


def dali_patches_differ(jpegs: list[bytes], shape: tuple[int, int, int],
                        size: int, count: int = DALI_CHECKED) -> int:
  """How many of `count` patches DALI's CPU decoding cuts differently from
  the default decoder's image (of the store's `shape`), cropped at the same
  (random) places: 0 when DALI's 'dali' row times the same pixels as the
  loader makes."""
  count = min(count, len(jpegs))
  decode = imagenet.DECODE[imagenet.default_decoder()]
  image = np.empty(shape, np.uint8)
  corners = np.random.default_rng(0).integers(
      0, np.array(shape[:2]) - size + 1, size=(count, 2))

  def source(_):
    return ([np.frombuffer(j, np.uint8) for j in jpegs[:count]],
            [np.array([x, y], np.float32) for y, x in corners])

  patches = _dali_pipeline(source, 2, 1, count,
                           lambda j, a: _dali_slice(j, a, size)).run()[0]
  differ = 0
  for n, (y, x) in enumerate(corners):
    decode(jpegs[n], image)
    differ += not np.array_equal(np.asarray(patches[n]),
                                 image[y:y + size, x:x + size])
  return differ


def time_dali(jpegs, mean_image, threads, size, batch_size, steps,
              warmup) -> float:
  from nvidia.dali import fn, types
  arrays = [np.frombuffer(j, np.uint8) for j in jpegs]
  order = np.random.default_rng(0).permutation(len(arrays))
  margin = np.array(mean_image.shape[:2]) - size
  mean = types.Constant(np.ascontiguousarray(mean_image, np.float32),
                        device='cpu')
  window = np.array([size, size], np.float32)

  def source(info):  # the JPEGs, shuffled, cycled through
    start = info.iteration * batch_size
    return [[arrays[order[(start + k) % len(arrays)]]
             for k in range(batch_size)]]

  def graph(jpeg):
    # [x, y], each uniform over the patch's places, as the other peers.
    top, left = (fn.random.uniform(values=[float(v) for v in range(m + 1)])
                 for m in margin)
    anchor = fn.stack(left, top)
    patch = _dali_slice(jpeg, anchor, size) - fn.slice(
        mean, anchor, window, normalized_anchor=False,
        normalized_shape=False)
    return fn.flip(patch, horizontal=fn.random.coin_flip())

  pipeline = _dali_pipeline(source, 1, threads, batch_size, graph)

  def batches():
    while True:
      yield pipeline.run()

  return _time_batches(batches(), steps, warmup, batch_size)


def _one_torch_thread(_):
  import torch
  torch.set_num_threads(1)


def time_torch(jpegs, mean_image, workers, size, batch_size, steps,
               warmup) -> float:
  import torch.utils.data
  loader = torch.utils.data.DataLoader(
      _TorchJpegs(jpegs, mean_image, size), batch_size=batch_size,
      shuffle=True, drop_last=True, num_workers=workers,
      persistent_workers=True, prefetch_factor=2,
      worker_init_fn=_one_torch_thread)

  def forever():
    while True:
      yield from loader

  return _time_batches(forever(), steps, warmup, batch_size)


def time_project(store_dir, threads, size, batch_size, steps, warmup
                 ) -> float:
  return loader_benchmark.run_benchmark(
      store_dir, workers=threads, processes=0, prefetch=2,
      batch_size=batch_size, steps=steps, warmup=warmup, image_size=size,
      decoder=None)['images_per_sec']


def run(store_dir: str, threads: list[int], pipelines: list[str], *,
        batch_size: int, image_size: int, steps: int, warmup: int,
        rounds: int) -> dict:
  source = store.SplitSource(store_dir, 'train')
  images = (steps + warmup) * batch_size
  # In memory, as many JPEGs as a timing uses (a whole ImageNet store would
  # not fit), cycled through by the decoders and the peers.
  jpegs = [bytes(source[i][1]) for i in range(min(len(source), images))]
  mean_image = store.Statistics.load(store_dir).mean_image.astype(np.float32)
  common = dict(size=image_size, batch_size=batch_size, steps=steps,
                warmup=warmup)
  timers, decoders, form_bytes, skipped = {}, [], {}, {}
  if 'forms' in pipelines:
    default = imagenet.DECODE[imagenet.default_decoder()]
    info = store.StoreInfo.load(store_dir)
    image = np.empty((info.image_size, info.image_size, 3), np.uint8)
    encoded = {form: [] for form in FORMS}
    for jpeg in jpegs:  # one image's pixels at a time, in every form
      default(jpeg, image)
      for form in list(encoded):
        try:
          encoded[form].append(encode_form(image, info.jpeg_quality, form))
        except ImportError as e:
          skipped[f'form {form}'] = str(e)
          del encoded[form]
    for form, form_jpegs in encoded.items():
      form_bytes[form] = float(np.mean([len(j) for j in form_jpegs]))
      timers[f'form {form}'] = (
          lambda count, form_jpegs=form_jpegs: time_decoder(
              default, form_jpegs, count, images))
  if 'decode' in pipelines:
    for name, decode in _decoders().items():
      decoders.append(f'decode {name}')
      timers[f'decode {name}'] = (
          lambda count, decode=decode: time_decoder(decode, jpegs, count,
                                                    images))
  if 'stages' in pipelines:
    for name, stages in STAGE_ROWS.items():
      timers[name] = (
          lambda count, stages=stages: loader_benchmark.time_added_stages(
              store_dir, stages, threads=count, image_size=image_size,
              decoder=None, batch_size=batch_size, batches=steps))
  peers = {
      'project': lambda count: time_project(store_dir, count, **common),
      'tf.data': lambda count: time_tf_data(jpegs, mean_image, count,
                                            **common),
      'torch': lambda count: time_torch(jpegs, mean_image, count, **common),
      'dali': lambda count: time_dali(jpegs, mean_image, count, **common)}
  timers.update({name: timer for name, timer in peers.items()
                 if name in pipelines})
  dali_differ = None
  if 'dali' in pipelines:
    try:
      dali_differ = dali_patches_differ(jpegs, mean_image.shape,
                                        image_size)
    except ImportError as e:
      skipped['dali'] = str(e)
  # Every round times every pipeline once at every count, one after the
  # other, every other round in the reverse order: the machine's speed
  # drifts over seconds to minutes, and each pipeline then meets the same
  # drifts. The table gives each one's median.
  samples = {}
  for number in range(rounds):
    order = list(timers.items())
    if number % 2:
      order.reverse()
    for count in threads:
      for name, timer in order:
        if name in skipped:
          continue
        try:
          samples.setdefault(name, {}).setdefault(count, []).append(
              timer(count))
        except ImportError as e:
          skipped[name] = str(e)
          samples.pop(name, None)
  rows = {name: {count: float(np.median(values))
                 for count, values in by_count.items()}
          for name, by_count in samples.items()}
  return {'images_per_sec': rows, 'samples': samples, 'skipped': skipped,
          'rounds': rounds, 'decoders': decoders, 'form_bytes': form_bytes,
          'form_decoder': imagenet.default_decoder(),
          'dali_patches_differ': dali_differ,
          'torch_decoder': ('torchvision.io' if _torchvision_io() is not None
                            else 'pil'),
          'threads': threads, 'jpegs': len(jpegs), 'batch_size': batch_size,
          'image_size': image_size, 'steps': steps,
          'cores': len(os.sched_getaffinity(0))}


def ratios(result: dict) -> dict:
  """Per thread count: the project over the best peer and over the
  fastest decoder alone, each 'decode + ...' row over that decoder, and
  each stored form over the one `prepare` writes."""
  rows = result['images_per_sec']
  out = {}
  for count in result['threads']:
    project = rows.get('project', {}).get(count)
    peers = [rows[p][count] for p in PEERS
             if count in rows.get(p, {})]
    decoders = [rows[k][count] for k in result['decoders']
                if count in rows.get(k, {})]
    out[count] = {
        'over_best_peer': project / max(peers) if project and peers else None,
        'of_fastest_decoder': (project / max(decoders)
                               if project and decoders else None),
        'stages_of_fastest_decoder': {
            name: v[count] / max(decoders) for name, v in rows.items()
            if name in STAGE_ROWS and count in v and decoders},
        'forms_over_prepare': {
            form: rows[f'form {form}'][count] / rows['form prepare'][count]
            for form in FORMS
            if count in rows.get(f'form {form}', {})
            and count in rows.get('form prepare', {})}}
  return out


def format_table(result: dict) -> str:
  threads = result['threads']
  lines = [f"{'images/s':<40}" + ''.join(f'{f"{t} thread(s)":>14}'
                                         for t in threads)]
  for name, by_count in result['images_per_sec'].items():
    if name == 'torch':  # which decoder the DataLoader's workers used
      name = f"torch ({result['torch_decoder']})"
    elif name.startswith('form '):  # and its mean JPEG size
      size = result['form_bytes'][name[len('form '):]]
      name = f'{name}, {size / 1000:.1f} KB'
    lines.append(f'{name:<40}' + ''.join(
        f'{by_count[t]:>14,.0f}' if t in by_count else f"{'-':>14}"
        for t in threads))
  for count, ratio in ratios(result).items():
    said = []
    if ratio['over_best_peer'] is not None:
      said.append(f"{ratio['over_best_peer']:.2f}x the best peer")
    if ratio['of_fastest_decoder'] is not None:
      said.append(f"{ratio['of_fastest_decoder']:.0%} of the fastest "
                  'decoder alone')
    if said:
      lines.append(f'{count} thread(s): project = ' + ', '.join(said))
    if ratio['stages_of_fastest_decoder']:
      lines.append(f'{count} thread(s): ' + ', '.join(
          f'{name} {value:.0%}' for name, value in
          ratio['stages_of_fastest_decoder'].items())
                   + ' of the fastest decoder alone')
    others = {form: value for form, value in
              ratio['forms_over_prepare'].items() if form != 'prepare'}
    if others:
      lines.append(f"{count} thread(s), {result['form_decoder']}: " + ', '.join(
          f'{form} {value:.2f}x' for form, value in others.items())
                   + " the form prepare writes")
  if result.get('dali_patches_differ') is not None:
    checked = min(result['jpegs'], DALI_CHECKED)
    lines.append(f"dali: {result['dali_patches_differ']} of its first "
                 f"{checked} patches differ from the "
                 f"{result['form_decoder']} image's")
  lines.append(f"(each figure the median of {result['rounds']} interleaved "
               'rounds)')
  for name, why in result['skipped'].items():
    lines.append(f'{name}: skipped ({why})')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.rounds < 1:
    raise app.UsageError(f'--rounds={FLAGS.rounds}: need at least 1')
  unknown = sorted(set(FLAGS.pipelines) - set(PIPELINES))
  if unknown:
    raise app.UsageError(f'--pipelines: {unknown} not among {PIPELINES}')
  try:
    threads = [int(t) for t in FLAGS.threads]
  except ValueError:
    threads = []
  if not threads or min(threads) < 1:
    raise app.UsageError(f'--threads={",".join(FLAGS.threads)}: need '
                         'counts of at least 1')
  if FLAGS.make_fake:
    loader_benchmark.write_fake_store(FLAGS.store, FLAGS.make_fake,
                                      max(FLAGS.make_fake // 50, 1))
  loader_benchmark.check_store_flag(FLAGS.store)
  result = run(FLAGS.store, threads, FLAGS.pipelines,
               batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
               steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds)
  result['ratios'] = ratios(result)
  print(format_table(result))
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
