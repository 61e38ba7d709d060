"""Published weights as runs: a torchvision AlexNet state_dict (both of
torch.save's formats) and a bvlc_alexnet-shaped caffemodel (three generations
of caffe.proto's layer messages), converted without PyTorch or Caffe, compute
what PyTorch computes with them; bad files fail with one clear error and
write nothing."""

import collections
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch import nn

from commands import command_env
from alexnet_jax import convert, models, runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Logits are scaled to a standard deviation of LOGIT_SCALE (an ImageNet
# network's are of this order), so TOLERANCE is 2e-5 of it: far above float32
# rounding, far below what a misplaced channel or row changes.
LOGIT_SCALE = 5.0
TOLERANCE = 1e-4
BATCH = 2


# --- Reference networks in PyTorch --------------------------------------------

class TorchvisionAlexNet(nn.Module):
  """torchvision.models.AlexNet, module for module (the same state_dict)."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d(6)
    self.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 1000))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class CaffeAlexNet(nn.Module):
  """bvlc_alexnet's deploy.prototxt: BGR input, LRN after the ReLU and
  before the pool in conv1 and conv2, Caffe's ceil-mode pooling (the same
  sizes as floor mode here).

  `lrn_columns=2` normalises each column's maps apart, as the paper and our
  'original' model do; Caffe's own LRN layer spans all maps (`lrn_columns=1`).
  """

  def __init__(self, lrn_columns=1, lrn_k=1.0):
    super().__init__()
    self.lrn_columns = lrn_columns
    self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=lrn_k)
    self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
    self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
    self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
    self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
    self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
    self.fc6 = nn.Linear(256 * 6 * 6, 4096)
    self.fc7 = nn.Linear(4096, 4096)
    self.fc8 = nn.Linear(4096, 1000)

  def lrn(self, x):
    return torch.cat([self.norm(c) for c in x.chunk(self.lrn_columns, 1)], 1)

  def forward(self, x):
    x = self.pool(self.lrn(torch.relu(self.conv1(x))))
    x = self.pool(self.lrn(torch.relu(self.conv2(x))))
    x = torch.relu(self.conv3(x))
    x = torch.relu(self.conv4(x))
    x = self.pool(torch.relu(self.conv5(x)))
    x = torch.relu(self.fc6(torch.flatten(x, 1)))
    x = torch.relu(self.fc7(x))
    return self.fc8(x)


def _he_init(net):
  """He-normal weights and small biases: activations keep their scale
  through the layers, so the comparison sees every layer's contribution."""
  for module in net.modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
      nn.init.uniform_(module.bias, -0.1, 0.1)


@torch.no_grad()
def _calibrated_logits(net, images_nchw, fc8):
  """Scales fc8 so that the logits have LOGIT_SCALE's spread; returns them."""
  logits = net(torch.from_numpy(images_nchw))
  factor = LOGIT_SCALE / float(logits.std())
  fc8.weight.mul_(factor)
  fc8.bias.mul_(factor)
  return net(torch.from_numpy(images_nchw)).numpy()


def _jax_logits(run, images_nhwc):
  logits = run.model().apply({'params': run.params}, images_nhwc, train=False)
  return np.asarray(logits)


# --- A minimal protobuf writer, independent of the converter's descriptor ---

def _varint(n):
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _int(number, value):
  return _varint(number << 3) + _varint(value)


def _bytes(number, payload):
  if isinstance(payload, str):
    payload = payload.encode()
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _blob(array, legacy):
  """A BlobProto: legacy ones give 4-D num/channels/height/width, newer ones
  a BlobShape; the values are packed little-endian floats either way."""
  if legacy:
    dims = (1,) * (4 - array.ndim) + array.shape
    header = b''.join(_int(n, d) for n, d in zip((1, 2, 3, 4), dims))
  else:
    header = _bytes(7, _bytes(1, b''.join(_varint(d) for d in array.shape)))
  return header + _bytes(5, array.astype('<f4').tobytes())


# bvlc_alexnet's layers in order: (name, V1 type enum, new type, bottom, top).
CAFFE_NET = [('data', 5, 'Data', None, 'data'),
             ('conv1', 4, 'Convolution', 'data', 'conv1'),
             ('relu1', 18, 'ReLU', 'conv1', 'conv1'),
             ('norm1', 15, 'LRN', 'conv1', 'norm1'),
             ('pool1', 17, 'Pooling', 'norm1', 'pool1'),
             ('conv2', 4, 'Convolution', 'pool1', 'conv2'),
             ('relu2', 18, 'ReLU', 'conv2', 'conv2'),
             ('norm2', 15, 'LRN', 'conv2', 'norm2'),
             ('pool2', 17, 'Pooling', 'norm2', 'pool2'),
             ('conv3', 4, 'Convolution', 'pool2', 'conv3'),
             ('conv4', 4, 'Convolution', 'conv3', 'conv4'),
             ('conv5', 4, 'Convolution', 'conv4', 'conv5'),
             ('pool5', 17, 'Pooling', 'conv5', 'pool5'),
             ('fc6', 14, 'InnerProduct', 'pool5', 'fc6'),
             ('drop6', 6, 'Dropout', 'fc6', 'fc6'),
             ('fc7', 14, 'InnerProduct', 'fc6', 'fc7'),
             ('fc8', 14, 'InnerProduct', 'fc7', 'fc8'),
             ('prob', 20, 'Softmax', 'fc8', 'prob')]


def caffemodel(blobs, generation):
  """A NetParameter holding `blobs` {layer: [weights, bias]}: 'v1' (`layers`,
  bvlc_alexnet's own), 'v0' (`layers` wrapping the older message) or 'new'
  (`layer`). Layer parameters such as convolution_param are left out: they
  are fields the reader must skip, and bottom and top already are."""
  net = [_bytes(1, 'AlexNet')]
  for name, v1_type, new_type, bottom, top in CAFFE_NET:
    arrays = blobs.get(name, [])
    if generation == 'new':
      layer = _bytes(1, name) + _bytes(2, new_type)
      layer += (_bytes(3, bottom) if bottom else b'') + _bytes(4, top)
      layer += b''.join(_bytes(7, _blob(a, legacy=False)) for a in arrays)
      net.append(_bytes(100, layer))
    elif generation == 'v1':
      layer = (_bytes(2, bottom) if bottom else b'') + _bytes(3, top)
      layer += _bytes(4, name) + _int(5, v1_type)
      layer += b''.join(_bytes(6, _blob(a, legacy=True)) for a in arrays)
      net.append(_bytes(2, layer))
    else:
      v0 = _bytes(1, name) + _bytes(2, new_type.lower())
      v0 += b''.join(_bytes(50, _blob(a, legacy=True)) for a in arrays)
      layer = (_bytes(2, bottom) if bottom else b'') + _bytes(3, top)
      net.append(_bytes(2, _bytes(1, v0) + layer))
  return b''.join(net)


# --- Fixtures ---------------------------------------------------------------

def _env(tmp_root):
  """The tests' compiler settings, and a `torch` that cannot be imported: the
  converter must not need PyTorch."""
  hidden = tmp_root / 'no_torch' / 'torch'
  hidden.mkdir(parents=True, exist_ok=True)
  (hidden / '__init__.py').write_text(
      "raise ImportError('PyTorch is not installed here')\n")
  return command_env(PYTHONPATH=f'{hidden.parent}{os.pathsep}{REPO_ROOT}')


def _command(*args):
  return [sys.executable, '-m', 'alexnet_jax.convert', *args]


def _convert(env, *args):
  return subprocess.run(_command(*args), cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('convert')


@pytest.fixture(scope='module')
def env(root):
  return _env(root)


def _torchvision_files(root):
  """A randomly initialised torchvision AlexNet, saved as a plain state_dict
  in the zip format and as a DataParallel checkpoint in the legacy format."""
  torch.manual_seed(0)
  net = TorchvisionAlexNet().eval()
  _he_init(net)
  images = np.random.default_rng(0).normal(
      size=(BATCH, 224, 224, 3)).astype(np.float32)
  logits = _calibrated_logits(net, images.transpose(0, 3, 1, 2),
                              net.classifier[6])
  state_dict = net.state_dict()
  torch.save(state_dict, root / 'alexnet.pth')
  torch.save({'epoch': 90, 'state_dict': collections.OrderedDict(
      ('module.' + k, v) for k, v in state_dict.items())},
             root / 'alexnet_legacy.pth', _use_new_zipfile_serialization=False)
  return {'state_dict': {k: v.numpy() for k, v in state_dict.items()},
          'images': images, 'logits': logits,
          'workdir': str(root / 'torchvision_run'),
          'zip': root / 'alexnet.pth', 'legacy': root / 'alexnet_legacy.pth',
          'flag': f'--torchvision={root / "alexnet.pth"}'}


def _caffe_files(root):
  """A randomly initialised bvlc_alexnet as a V1 caffemodel. Its input has the
  spread of mean-subtracted 0..255 pixels, which is what makes Caffe's LRN
  constants matter."""
  torch.manual_seed(1)
  net = CaffeAlexNet().eval()
  _he_init(net)
  bgr = np.random.default_rng(1).normal(
      scale=60.0, size=(BATCH, 227, 227, 3)).astype(np.float32)
  logits = _calibrated_logits(net, bgr.transpose(0, 3, 1, 2), net.fc8)
  blobs = {name: [getattr(net, name).weight.detach().numpy(),
                  getattr(net, name).bias.detach().numpy()]
           for name in models.CONV_LAYERS + models.FC_LAYERS}
  path = root / 'bvlc_alexnet.caffemodel'
  path.write_bytes(caffemodel(blobs, 'v1'))
  return {'net': net, 'blobs': blobs, 'bgr': bgr, 'logits': logits,
          'workdir': str(root / 'caffe_run'), 'flag': f'--caffe={path}'}


@pytest.fixture(scope='module')
def converted(root, env):
  """Both networks, converted by two command lines running side by side."""
  nets = {'torchvision': _torchvision_files(root), 'caffe': _caffe_files(root)}
  processes = {
      name: subprocess.Popen(
          _command(net['flag'], f'--workdir={net["workdir"]}'),
          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True)
      for name, net in nets.items()}
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (name, stderr)
    nets[name]['run'] = runs.restore(nets[name]['workdir'])
  return nets


@pytest.fixture(scope='module')
def torchvision_net(converted):
  return converted['torchvision']


@pytest.fixture(scope='module')
def caffe_net(converted):
  return converted['caffe']


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# --- torchvision ----------------------------------------------------------------

def test_torchvision_run_computes_pytorchs_logits(torchvision_net):
  run = torchvision_net['run']
  assert run.step == 0
  assert run.config.model.variant == 'owt'
  assert run.config.model.num_classes == 1000
  assert run.config.input.normalization == 'imagenet_mean_std'
  assert run.config.dataset == 'imagenet2012'
  logits = _jax_logits(run, torchvision_net['images'])
  np.testing.assert_allclose(logits, torchvision_net['logits'], rtol=0,
                             atol=TOLERANCE)


def test_legacy_format_checkpoint_gives_the_same_parameters(torchvision_net):
  # The legacy file holds the same tensors inside {'epoch', 'state_dict'},
  # each named 'module.'...: equal parameters, so equal logits.
  state_dict = convert.read_torch(str(torchvision_net['legacy']))
  assert set(state_dict) == set(torchvision_net['state_dict'])
  _, params = convert.from_torchvision(state_dict)
  _assert_same_params(params, torchvision_net['run'].params)


def test_fc8_of_other_classes_sets_num_classes(torchvision_net):
  state_dict = dict(torchvision_net['state_dict'])
  state_dict['classifier.6.weight'] = np.ones((10, 4096), np.float32)
  state_dict['classifier.6.bias'] = np.arange(10, dtype=np.float32)
  config, params = convert.from_torchvision(state_dict)
  assert config.model.num_classes == 10
  np.testing.assert_array_equal(params['fc8']['kernel'],
                                np.ones((4096, 10), np.float32))
  np.testing.assert_array_equal(params['fc8']['bias'], np.arange(10))


@pytest.mark.parametrize('zip_format', [True, False])
def test_reads_strided_typed_and_wrapped_tensors(tmp_path, zip_format):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6) / 7
  tensors = {
      'transposed': base.float().t(),            # strides (1, 6)
      'row': base.float()[2, 1:5],               # an offset into the storage
      'every_other': base.float()[:, ::2],
      'double': base,
      'half': base.half(),
      'bfloat16': base.bfloat16(),
      'empty': torch.zeros(0, 3)}
  path = tmp_path / 'tensors.pth'
  torch.save({'model': collections.OrderedDict(
      ('module.' + k, v) for k, v in tensors.items()), 'epoch': 1}, path,
             _use_new_zipfile_serialization=zip_format)
  read = convert.read_torch(str(path))
  assert list(read) == list(tensors)
  for name, tensor in tensors.items():
    assert read[name].shape == tuple(tensor.shape), name
    np.testing.assert_array_equal(np.asarray(read[name], np.float64),
                                  tensor.double().numpy(), err_msg=name)
  assert read['half'].dtype == np.float16
  assert read['double'].dtype == np.float64


# --- Caffe --------------------------------------------------------------------

def test_caffe_run_computes_caffes_logits_on_rgb(caffe_net):
  run = caffe_net['run']
  assert run.step == 0
  model = run.config.model
  assert (model.variant, model.num_classes) == ('original', 1000)
  assert (model.lrn_n, model.lrn_k, model.lrn_beta) == (5, 1.0, 0.75)
  assert model.lrn_alpha == pytest.approx(2e-5)
  assert model.lrn_across_columns
  assert run.config.input.normalization == 'mean_image'
  logits = _jax_logits(run, np.ascontiguousarray(caffe_net['bgr'][..., ::-1]))
  np.testing.assert_allclose(logits, caffe_net['logits'], rtol=0,
                             atol=TOLERANCE)


@torch.no_grad()
def test_caffe_comparison_would_see_wrong_lrn_or_channel_order(caffe_net):
  # The comparison above is only as sharp as the input makes it: here the
  # paper's k=2, or RGB fed to BGR weights, move the logits by far more than
  # the tolerance.
  net, bgr = caffe_net['net'], caffe_net['bgr']
  paper_k = CaffeAlexNet(lrn_k=2.0).eval()
  paper_k.load_state_dict(net.state_dict())
  per_column = CaffeAlexNet(lrn_columns=2).eval()
  per_column.load_state_dict(net.state_dict())
  for other, images in ((paper_k, bgr), (per_column, bgr),
                        (net, bgr[..., ::-1])):
    logits = other(torch.from_numpy(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
    assert np.abs(logits - caffe_net['logits']).max() > 1000 * TOLERANCE


@pytest.mark.parametrize('generation', ['new', 'v0'])
def test_other_caffemodel_generations_give_the_same_parameters(
    caffe_net, tmp_path, generation):
  path = tmp_path / 'net.caffemodel'
  path.write_bytes(caffemodel(caffe_net['blobs'], generation))
  _, params = convert.from_caffe(convert.read_caffe(str(path)))
  _assert_same_params(params, caffe_net['run'].params)


def test_lrn_differs_from_caffes_only_at_the_column_boundary():
  # Caffe's LRN window runs across all 96 maps of conv1, the paper's (and
  # the converted model's) stops at the column boundary: maps 46 to 49 see a
  # different window, the other 92 the same one.
  x = np.random.default_rng(2).normal(scale=100.0,
                                      size=(1, 5, 5, 96)).astype(np.float32)
  ours = np.asarray(models.grouped_lrn(x, 2, n=5, k=1.0, alpha=2e-5,
                                       beta=0.75))
  caffe = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(
      torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  differs = np.abs(ours - caffe).max(axis=(0, 1, 2)) > 1e-4 * np.abs(x).max()
  assert np.flatnonzero(differs).tolist() == [46, 47, 48, 49]


# --- Bad input ------------------------------------------------------------------

def _assert_refused(result, *words):
  assert result.returncode == 1, result.stdout + result.stderr
  lines = [line for line in result.stderr.splitlines()
           if line.startswith('error: ')]
  assert len(lines) == 1, result.stderr
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert 'Traceback' not in result.stderr


def test_missing_file(root, env, tmp_path):
  missing = root / 'no_such.pth'
  result = _convert(env, f'--torchvision={missing}',
                    f'--workdir={tmp_path / "run"}')
  _assert_refused(result, str(missing), 'does not exist')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flag,content,words', [
    ('torchvision', np.random.default_rng(3).bytes(4096),
     ('not a PyTorch checkpoint',)),
    ('torchvision', b'features.0.weight: 1 2 3\n' * 50,
     ('not a PyTorch checkpoint',)),
    ('caffe', b'name: "AlexNet"\nlayer {\n  name: "conv1"\n}\n',
     ('not a .caffemodel',))], ids=['random_bytes', 'text', 'prototxt'])
def test_not_a_checkpoint(env, tmp_path, flag, content, words):
  path = tmp_path / 'weights'
  path.write_bytes(content)
  result = _convert(env, f'--{flag}={path}', f'--workdir={tmp_path / "run"}')
  _assert_refused(result, str(path), *words)
  assert not (tmp_path / 'run').exists()


def test_wrong_shape_missing_and_unexpected_keys_in_one_error(env, tmp_path):
  path = tmp_path / 'bad.pth'
  torch.save({'features.0.weight': torch.zeros(64, 3, 11, 11),
              'features.3.weight': torch.zeros(192, 64, 3, 3),
              'features.1.weight': torch.zeros(3)}, path)
  result = _convert(env, f'--torchvision={path}',
                    f'--workdir={tmp_path / "run"}')
  missing = [f'{layer}.{leaf} is missing'
             for layer in convert.TORCHVISION_LAYERS.values()
             for leaf in ('weight', 'bias')
             if f'{layer}.{leaf}' not in ('features.0.weight',
                                          'features.3.weight')]
  _assert_refused(result, 'features.3.weight is (192, 64, 3, 3)',
                  '(192, 64, 5, 5)', 'features.1.weight is not a parameter',
                  *missing)
  assert len(missing) == 14
  assert 'features.0.weight' not in result.stderr
  assert not (tmp_path / 'run').exists()


class _RunsCode:
  """What a malicious pickle holds: unpickling it calls os.system."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_pickle_that_calls_code_is_refused(env, tmp_path):
  marker = tmp_path / 'ran'
  path = tmp_path / 'evil.pth'
  torch.save({'features.0.weight': _RunsCode(f'touch {marker}')}, path)
  result = _convert(env, f'--torchvision={path}',
                    f'--workdir={tmp_path / "run"}')
  _assert_refused(result, 'system', 'refused')
  legacy = tmp_path / 'evil_legacy.pth'
  torch.save({'features.0.weight': _RunsCode(f'touch {marker}')}, legacy,
             _use_new_zipfile_serialization=False)
  with pytest.raises(convert.ConversionError, match='system.*refused'):
    convert.read_torch(str(legacy))
  assert not marker.exists()
  assert not (tmp_path / 'run').exists()


def test_workdir_with_checkpoints_is_refused_and_kept(torchvision_net):
  workdir = torchvision_net['workdir']

  def files():
    return {os.path.relpath(os.path.join(d, name), workdir):
            os.stat(os.path.join(d, name)).st_mtime_ns
            for d, _, names in os.walk(workdir) for name in names}

  before = files()
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    convert.convert(workdir, torchvision=str(torchvision_net['zip']))
  assert files() == before
