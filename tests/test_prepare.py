"""The preparation command: ImageNet built by TFDS from fake ILSVRC-2012
archives, a folder of images, and another TFDS dataset, into the store."""

import collections
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from commands import command_env
from alexnet_jax import prepare, store
from fake_ilsvrc import make_fake_ilsvrc2012

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real synsets far apart in TFDS's list (indices 1, 230 and 970), so that a
# label numbered by the classes present instead of by the full list fails.
# n02105855 and n09193705 are also the labels TFDS gives the 3rd and 2nd real
# validation images.
CLASSES = ('n01443537', 'n02105855', 'n09193705')
PER_CLASS = 2
NUM_VAL = 4
SHARD_SIZE = 4   # 10 training files: shards of 4, 4 and 2 records
WORKERS = 2


class _Interrupted(Exception):
  pass


def _tfds_order(data_dir, split):
  """TFDS's file names in its record order, read without TensorFlow."""
  import tensorflow_datasets as tfds
  source = tfds.data_source('imagenet2012', split=split, data_dir=data_dir,
                            decoders={'image': tfds.decode.SkipDecoding()})
  return [example['file_name'].decode() for example in source]


def _records(out, split):
  source = store.SplitSource(out, split)
  return [source[i] for i in range(len(source))]


def _pixels(jpeg):
  image = Image.open(io.BytesIO(jpeg))
  assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', (256, 256))
  return np.asarray(image)


def _store_files(out):
  """Every file's bytes, info.json aside (it is compared field by field)."""
  files = {}
  for name in sorted(os.listdir(out)):
    if name != store.INFO:
      with open(os.path.join(out, name), 'rb') as f:
        files[name] = f.read()
  return files


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """The fake ImageNet prepared twice: by the command line, which has TFDS
  build imagenet2012 (with TensorFlow, kept out of the test process), and by
  a call in this process, which finds it built."""
  root = tmp_path_factory.mktemp('imagenet')
  manual_dir, data_dir = str(root / 'manual'), str(root / 'tfds')
  fake = make_fake_ilsvrc2012(manual_dir, classes=CLASSES,
                              per_class=PER_CLASS, num_val=NUM_VAL)
  command = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.prepare', '--dataset=imagenet2012',
       f'--manual_dir={manual_dir}', f'--data_dir={data_dir}',
       f'--out={root / "command_store"}', f'--workers={WORKERS}',
       f'--shard_size={SHARD_SIZE}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  tensorflow_before = 'tensorflow' in sys.modules
  out = str(root / 'store')
  info = prepare.prepare('imagenet2012', out, manual_dir=manual_dir,
                         data_dir=data_dir, workers=WORKERS,
                         shard_size=SHARD_SIZE)
  tensorflow_after = 'tensorflow' in sys.modules
  import tensorflow_datasets as tfds
  labels = tfds.builder('imagenet2012', data_dir=data_dir
                        ).info.features['label'].names
  with open(tfds.core.tfds_path(
      'datasets/imagenet2012/validation_labels.txt')) as f:
    val_synsets = f.read().split()[:NUM_VAL]
  return dict(root=root, fake=fake, out=out, info=info, labels=labels,
              val_synsets=val_synsets, data_dir=data_dir,
              manual_dir=manual_dir, command=command,
              command_out=str(root / 'command_store'),
              tensorflow=(tensorflow_before, tensorflow_after))


def test_split_sizes_and_report(imagenet):
  fake, out = imagenet['fake'], imagenet['out']
  info = store.check_store(out)
  assert info == imagenet['info']
  assert len(fake.truncated) == 1
  assert info.sizes == {'train': len(fake.train) - 1, 'validation': NUM_VAL}
  assert info.shards == {
      'train': [store.shard_name('train', k) for k in range(3)],
      'validation': [store.shard_name('validation', 0)]}
  with open(os.path.join(out, store.REPORT)) as f:
    report = json.load(f)
  (skipped,) = report['skipped']
  assert skipped['split'] == 'train'
  assert skipped['file'] == fake.truncated[0].file_name
  assert 'truncated' in skipped['reason']
  assert report['counts'] == {
      'train': {'source': len(fake.train), 'written': len(fake.train) - 1,
                'skipped': 1},
      'validation': {'source': NUM_VAL, 'written': NUM_VAL, 'skipped': 0}}
  # Finished: no bookkeeping left beside the shards.
  assert not [n for n in os.listdir(out) if n.endswith(prepare.PARTIAL)]


def test_labels_are_indices_in_the_full_tfds_class_list(imagenet):
  labels, fake = imagenet['labels'], imagenet['fake']
  assert len(labels) == 1000
  assert imagenet['info'].class_names == list(labels)
  assert [labels.index(c) for c in CLASSES] == [1, 230, 970]
  # Every file but the truncated one, each with its synset's label, in TFDS's
  # record order.
  names = [n for n in _tfds_order(imagenet['data_dir'], 'train')
           if n != fake.truncated[0].file_name]
  assert sorted(names) == sorted(i.file_name for i in fake.train
                                 if i.kind != 'truncated')
  train = _records(imagenet['out'], 'train')
  assert [label for label, _ in train] == [
      labels.index(n.split('_')[0]) for n in names]
  # Validation labels are TFDS's, by the sorted position of the file names.
  names = _tfds_order(imagenet['data_dir'], 'validation')
  validation = _records(imagenet['out'], 'validation')
  assert [label for label, _ in validation] == [
      labels.index(imagenet['val_synsets'][int(n[-13:-5]) - 1])
      for n in names]
  # The first real validation images: a sea snake, an alp, a sheepdog.
  first = {n: label for n, (label, _) in zip(names, validation)}
  assert [first[f'ILSVRC2012_val_{k:08d}.JPEG'] for k in (1, 2, 3)] == [
      65, 970, 230]


def test_every_image_is_the_rgb_central_crop(imagenet):
  fake = imagenet['fake']
  by_name = {i.file_name: i for i in fake.train}
  names = [n for n in _tfds_order(imagenet['data_dir'], 'train')
           if by_name[n].kind != 'truncated']
  kinds = collections.Counter()
  for name, (_, jpeg) in zip(names, _records(imagenet['out'], 'train')):
    image = by_name[name]
    mean = _pixels(jpeg).reshape(-1, 3).mean(axis=0)
    # The drawn picture's gradients average out over any central crop, so
    # the stored image keeps the drawn colour: a CMYK file read with its
    # channels inverted, or a PNG not decoded, would not.
    if image.kind == 'grey':
      grey = np.dot(image.colour, [0.299, 0.587, 0.114])
      np.testing.assert_allclose(mean, [grey] * 3, atol=3)
    else:
      np.testing.assert_allclose(mean, image.colour, atol=3)
    kinds[image.kind] += 1
  assert kinds == {'rgb': len(CLASSES) * PER_CLASS, 'cmyk': 1, 'grey': 1,
                   'png': 1}
  for _, jpeg in _records(imagenet['out'], 'validation'):
    _pixels(jpeg)


def test_central_crop_of_a_non_square_image():
  # Left half red, right half blue, with a green border band on the long
  # side: the crop keeps the middle, and both halves equally.
  pixels = np.zeros((200, 400, 3), np.uint8)
  pixels[:, :200] = (255, 0, 0)
  pixels[:, 200:] = (0, 0, 255)
  pixels[:, :90] = pixels[:, 310:] = (0, 255, 0)
  crop = np.asarray(prepare.central_crop(Image.fromarray(pixels)), np.float64)
  assert crop.shape == (256, 256, 3)
  np.testing.assert_allclose(crop[:, :120].mean(axis=(0, 1)), (255, 0, 0),
                             atol=1)
  np.testing.assert_allclose(crop[:, 136:].mean(axis=(0, 1)), (0, 0, 255),
                             atol=1)
  assert crop[..., 1].max() < 1  # the green bands are outside the crop


def test_stored_jpegs_take_their_own_huffman_tables_and_keep_the_pixels():
  # prepare.JPEG_OPTIONS' `optimize`: the same coefficients as the standard
  # tables code, so every decoder gives the same pixels, from fewer bytes;
  # stores written before with the standard tables read the same images.
  from alexnet_jax import imagenet, loader_benchmark
  image = Image.fromarray(
      loader_benchmark.natural_image(np.random.default_rng(0)))
  stored = prepare.encode_jpeg(image, 90)
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=90, subsampling='4:2:0')
  standard = buffer.getvalue()
  assert len(stored) < 0.97 * len(standard)
  with Image.open(io.BytesIO(stored)) as opened:
    assert opened.layer[0][1:3] == (2, 2)  # 4:2:0: luma 2x2, chroma 1x1
  for name, decode in imagenet.DECODE.items():
    ours, theirs = (np.empty((256, 256, 3), np.uint8) for _ in range(2))
    decode(stored, ours)
    decode(standard, theirs)
    np.testing.assert_array_equal(ours, theirs, err_msg=name)
  # The fake stores of the benchmarks are in the same form.
  assert loader_benchmark.encode_jpeg(np.asarray(image)) == stored


def test_statistics_equal_a_direct_float64_computation(imagenet):
  out = imagenet['out']
  images = np.stack([_pixels(jpeg) for _, jpeg in _records(out, 'train')]
                    ).astype(np.float64)
  rgb = images.reshape(-1, 3) / 255.0
  covariance = np.cov(rgb, rowvar=False, bias=True)
  with open(os.path.join(out, store.STATS)) as f:
    stats = {k: np.asarray(v) for k, v in json.load(f).items()}
  np.testing.assert_allclose(stats['mean_rgb'], rgb.mean(axis=0) * 255,
                             rtol=1e-12)
  expected_val, expected_vec = np.linalg.eigh(covariance)
  np.testing.assert_allclose(stats['eigval'], expected_val[::-1], rtol=1e-9)
  np.testing.assert_allclose(np.abs(stats['eigvec']),
                             np.abs(expected_vec[:, ::-1]), atol=1e-9)
  np.testing.assert_allclose(covariance @ stats['eigvec'],
                             stats['eigvec'] * stats['eigval'], atol=1e-12)
  mean_image = np.load(os.path.join(out, store.MEAN_IMAGE))
  assert mean_image.dtype == np.float32 and mean_image.shape == (256, 256, 3)
  np.testing.assert_allclose(mean_image, images.mean(axis=0), rtol=1e-6)
  loaded = store.Statistics.load(out)
  np.testing.assert_allclose(loaded.mean_rgb, mean_image.mean(axis=(0, 1)),
                             rtol=1e-5)


def test_interrupted_preparation_continues_to_the_same_store(imagenet,
                                                             tmp_path):
  out = str(tmp_path / 'store')
  written = []

  def interrupt_after_two(split, index):
    written.append((split, index))
    if len(written) == 2:
      raise _Interrupted

  kwargs = dict(manual_dir=imagenet['manual_dir'],
                data_dir=imagenet['data_dir'], workers=WORKERS,
                shard_size=SHARD_SIZE)
  with pytest.raises(_Interrupted):
    prepare.prepare('imagenet2012', out, on_shard=interrupt_after_two,
                    **kwargs)
  assert written == [('train', 0), ('train', 1)]
  assert not store.StoreInfo.load(out).complete
  with pytest.raises(store.StoreError, match='only partly prepared'):
    store.check_store(out)
  # Killed between a shard and its bookkeeping: that shard is made again.
  os.remove(os.path.join(out, store.shard_name('train', 1) + prepare.PARTIAL))

  written.clear()
  info = prepare.prepare('imagenet2012', out, on_shard=lambda *a:
                         written.append(a), **kwargs)
  assert written == [('train', 1), ('train', 2), ('validation', 0)]
  assert info == imagenet['info'] and info.complete
  assert _store_files(out) == _store_files(imagenet['out'])

  # A finished store is left as it is.
  written.clear()
  prepare.prepare('imagenet2012', out, on_shard=lambda *a: written.append(a),
                  **kwargs)
  assert not written
  with pytest.raises(prepare.PrepareError, match='jpeg_quality differs'):
    prepare.prepare('imagenet2012', out, quality=80, **kwargs)


def test_command_line_writes_the_same_store(imagenet):
  command = imagenet['command']
  assert command.returncode == 0, command.stderr
  assert 'records/s' in command.stderr and 'left' in command.stderr
  assert store.check_store(imagenet['command_out']) == imagenet['info']
  assert (_store_files(imagenet['command_out'])
          == _store_files(imagenet['out']))


def test_reading_a_built_dataset_needs_no_tensorflow(imagenet):
  before, after = imagenet['tensorflow']
  assert after == before
  result = subprocess.run(
      [sys.executable, '-c', 'import sys; import alexnet_jax.prepare; '
       'print("tensorflow" in sys.modules)'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  assert result.stdout.strip() == 'False', result.stderr


def test_missing_archive_names_the_directory_and_files(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  (manual_dir / prepare.TRAIN_TAR).write_bytes(b'')
  with pytest.raises(FileNotFoundError) as error:
    prepare.prepare('imagenet2012', str(tmp_path / 'store'),
                    manual_dir=str(manual_dir),
                    data_dir=str(tmp_path / 'tfds'))
  message = str(error.value)
  assert (f'missing from the manual directory {manual_dir}: '
          f'{prepare.VAL_TAR}.') in message
  assert prepare.TRAIN_TAR in message  # the help names both files
  assert not (tmp_path / 'store').exists()

  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.prepare', '--dataset=imagenet2012',
       f'--data_dir={tmp_path / "tfds"}', f'--out={tmp_path / "store"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  default_manual = os.path.join(tmp_path, 'tfds', 'downloads', 'manual')
  assert (f'error: ImageNet archives missing from the manual directory '
          f'{default_manual}: {prepare.TRAIN_TAR}, {prepare.VAL_TAR}.'
          ) in result.stderr
  assert 'Traceback' not in result.stderr


def _write_image(path, size, colour, kind='JPEG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.full((size[1], size[0], 3), colour, np.uint8)
  Image.fromarray(pixels).save(path, kind)


def test_folder_dataset(tmp_path):
  root = tmp_path / 'flat'
  sizes = ((300, 200), (180, 320))
  for c, name in enumerate(('eel', 'cat', 'dog')):
    for k in range(5):
      _write_image(str(root / name / f'{k}.jpg'), sizes[k % 2],
                   (40 * c + 10 * k, 100, 50), 'JPEG' if k else 'PNG')
  (root / 'dog' / 'notes.txt').write_text('not an image')
  out = str(tmp_path / 'store')
  kwargs = dict(source=str(root), val_fraction=0.2, workers=WORKERS,
                shard_size=3)

  def interrupt(split, index):
    raise _Interrupted

  with pytest.raises(_Interrupted):
    prepare.prepare('folder', out, on_shard=interrupt, **kwargs)
  # Files added before the rerun would shift every later shard: refused.
  _write_image(str(root / 'cat' / 'late.jpg'), (64, 64), (0, 0, 0))
  with pytest.raises(prepare.PrepareError, match='other train files'):
    prepare.prepare('folder', out, **kwargs)
  os.remove(root / 'cat' / 'late.jpg')
  info = prepare.prepare('folder', out, **kwargs)
  assert store.check_store(out) == info
  assert info.class_names == ['cat', 'dog', 'eel']
  with open(os.path.join(out, store.REPORT)) as f:
    report = json.load(f)
  (skipped,) = report['skipped']
  assert skipped['file'] == os.path.join('dog', 'notes.txt')
  assert 'cannot identify image file' in skipped['reason']
  # One file of each class held out (round(0.2 * 5) and round(0.2 * 6));
  # dog's may be notes.txt.
  held_out = 3 - (skipped['split'] == 'validation')
  assert info.sizes == {'train': 15 - held_out, 'validation': held_out}
  labels = collections.Counter()
  for split in ('train', 'validation'):
    for label, jpeg in _records(out, split):
      labels[label] += 1
      _pixels(jpeg)
  assert labels == {0: 5, 1: 5, 2: 5}
  assert _records(out, 'validation')[0][0] == 0  # sorted: class by class

  split_root = tmp_path / 'split'
  for split, count in (('train', 3), ('val', 1)):
    for name in ('a', 'b'):
      for k in range(count):
        _write_image(str(split_root / split / name / f'{k}.jpg'), (64, 48),
                     (10, 20, 30))
  out = str(tmp_path / 'split_store')
  info = prepare.prepare('folder', out, source=str(split_root),
                         workers=WORKERS)
  assert info.class_names == ['a', 'b']
  assert info.sizes == {'train': 6, 'validation': 2}
  assert [label for label, _ in _records(out, 'validation')] == [0, 1]


def _shapes_builder(name, splits, pkg_dir):
  """A TFDS image classification dataset built from code (no download;
  PNG bytes, which TFDS stores without needing TensorFlow)."""
  import tensorflow_datasets as tfds
  from etils import epath

  def generate_examples(self, count, seed):
    del self
    rng = np.random.default_rng(seed)
    for k in range(count):
      png = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8)).save(
          png, 'PNG')
      yield k, {'image': png.getvalue(), 'label': k % 2}

  # type(): TFDS registers a builder under its class's name, chosen here.
  return type(name, (tfds.core.GeneratorBasedBuilder,), {
      'VERSION': tfds.core.Version('1.0.0'),
      'pkg_dir_path': epath.Path(pkg_dir),  # not in a package: say where
      '_info': lambda self: self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(encoding_format='png'),
              'label': tfds.features.ClassLabel(names=['round', 'square'])}),
          supervised_keys=('image', 'label')),
      '_split_generators': lambda self, dl_manager: {
          split: self._generate_examples(count, seed)
          for seed, (split, count) in enumerate(splits.items())},
      '_generate_examples': generate_examples,
  })


@pytest.mark.parametrize('splits,sizes,origins', [
    ({'train': 5, 'test': 2}, {'train': 5, 'validation': 2},
     {'train': 'train', 'validation': 'test'}),
    ({'train': 10}, {'train': 8, 'validation': 2},
     {'train': 'train[:80%]', 'validation': 'train[80%:]'}),
])
def test_other_tfds_dataset(tmp_path, splits, sizes, origins):
  """Another TFDS dataset: its test split, or the end of its train split,
  becomes the store's validation split."""
  import tensorflow_datasets as tfds
  name = f'PrepareTestShapes{len(splits)}'
  builder = _shapes_builder(name, splits, tmp_path)
  out = str(tmp_path / 'store')
  data_dir = str(tmp_path / 'tfds')
  info = prepare.prepare(builder.name, out, data_dir=data_dir,
                         val_fraction=0.2, workers=WORKERS)
  assert store.check_store(out) == info
  assert info.class_names == ['round', 'square']
  assert info.sizes == sizes
  with open(os.path.join(out, store.REPORT)) as f:
    assert json.load(f)['source']['splits'] == origins
  for split, origin in origins.items():
    source = tfds.data_source(builder.name, split=origin, data_dir=data_dir)
    assert [label for label, _ in _records(out, split)] == [
        int(example['label']) for example in source]


def test_train_an_epoch_and_evaluate_with_ten_patches(imagenet, tmp_path):
  # The whole ImageNet path on the fake archives: the prepared store trains an
  # epoch through the command line and is evaluated with the paper's ten
  # patches, by the trainer and again by the evaluate command.
  workdir = str(tmp_path / 'work')
  env = command_env()
  trained = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main',
       '--config=configs/one_gpu.py:synthetic', f'--workdir={workdir}',
       '--config.dataset=imagenet2012', f'--config.store_dir={imagenet["out"]}',
       '--config.model.num_classes=1000', '--config.batch_size=4',
       '--config.eval_batch_size=2', '--config.num_epochs=1',
       '--config.ten_crop_eval=True', '--config.input.workers=2'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert trained.returncode == 0, trained.stderr[-3000:]
  steps = imagenet['info'].sizes['train'] // 4
  assert f'final: step {steps}' in trained.stdout
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if r['split'] == 'eval'][-1]
  assert final['step'] == steps

  evaluated = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.evaluate', f'--workdir={workdir}',
       '--ten_crop'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert result['patches'] == 10 and result['step'] == steps
  for name in ('loss', 'top1', 'top5'):
    assert abs(result[name] - final[name]) <= 1e-5 * max(1.0, abs(final[name]))
