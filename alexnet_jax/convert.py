"""Published AlexNet weights as a run: torchvision's and Caffe's bvlc_alexnet.

    python -m alexnet_jax.convert --torchvision=alexnet-owt-7be5be79.pth --workdir=DIR
    python -m alexnet_jax.convert --caffe=bvlc_alexnet.caffemodel --workdir=DIR

torchvision's AlexNet is the one weird trick layout ('owt', 224 input, no LRN)
and its weights expect torchvision's per-channel normalisation; Caffe's
bvlc_alexnet is the 2012 two-column network ('original', 227 input, LRN) and
expects the mean image subtracted. DIR becomes a step-0 run of that model, so
`alexnet_jax.evaluate`, `alexnet_jax.predict` and fine-tuning
(`--config.init_from=DIR`) load it like a trained one. Neither PyTorch nor
Caffe is needed: torch.save's files are read with a pickle reader that rebuilds
tensors and nothing else, and the caffemodel with a protobuf descriptor of the
few caffe.proto messages that hold the weights. docs/converting_weights.md
describes the mapping.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
from absl import app, flags, logging
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from alexnet_jax import checkpointing, models, runs, validation
from configs import default

FLAGS = flags.FLAGS


class ConversionError(ValueError):
  """The file is not a checkpoint of the network, or cannot be read safely."""


# Our layers and where torchvision's nn.Sequential keeps them; the indices in
# between are ReLUs, pools and dropouts, which have no parameters.
TORCHVISION_LAYERS = {
    'conv1': 'features.0', 'conv2': 'features.3', 'conv3': 'features.6',
    'conv4': 'features.8', 'conv5': 'features.10', 'fc6': 'classifier.1',
    'fc7': 'classifier.4', 'fc8': 'classifier.6'}
# bvlc_alexnet names its layers as the paper does.
CAFFE_LAYERS = {layer: layer for layer in models.CONV_LAYERS + models.FC_LAYERS}


# --- torch.save's files, read without PyTorch --------------------------------

# torch.save's magic number, first in the legacy (pre-zip) format.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage named in the pickle; its bytes are stored outside it."""
  key: str
  dtype: np.dtype
  # A legacy-format view of another storage: its first element and size.
  start: int
  numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, offset, size, stride, *unused):
  # torch._utils._rebuild_tensor (legacy files) and _rebuild_tensor_v2, whose
  # further arguments (requires_grad, hooks, metadata) do not matter here.
  if not (isinstance(storage, _Storage) and _is_index(offset)
          and isinstance(size, tuple) and isinstance(stride, tuple)
          and len(size) == len(stride)
          and all(map(_is_index, size + stride))):
    raise ConversionError('a tensor in the pickle is malformed: storage '
                          f'{storage!r}, offset {offset!r}, size {size!r}, '
                          f'stride {stride!r}')
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


class _TensorUnpickler(pickle.Unpickler):
  """Unpickles dicts of tensors; refuses every other global.

  Pickle calls whatever its globals name, so a checkpoint may run any code
  when loaded; this reader lets through only what rebuilds a tensor (as a
  placeholder, `_Tensor`) and OrderedDict.
  """

  def __init__(self, file, path: str):
    super().__init__(file, encoding='utf-8')
    self.path = path
    self.dtypes: dict[str, np.dtype] = {}

  def find_class(self, module, name):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor',
                                             '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise ConversionError(
        f'{self.path} asks to load {module}.{name}, which is refused: only '
        'tensors and dicts are read from a checkpoint, because anything else '
        'in a pickle can run code. If it is a training checkpoint, save the '
        "model's state_dict alone (torch.save(model.state_dict(), PATH)).")

  def persistent_load(self, pid):
    # ('storage', type, key, location, numel), and in the legacy format a
    # sixth element: None, or (view key, offset, size) for a view.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6)
            and pid[0] == 'storage' and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and _is_index(pid[4])):
      raise ConversionError(f'{self.path} names a storage {pid!r} that is '
                            'not one torch.save writes')
    dtype, key, numel = pid[1].dtype, pid[2], pid[4]
    if self.dtypes.setdefault(key, dtype) != dtype:
      raise ConversionError(f'{self.path}: storage {key} is read both as '
                            f'{self.dtypes[key]} and as {dtype}')
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return _Storage(key, dtype, 0, numel)
    if not (isinstance(view, tuple) and len(view) == 3
            and _is_index(view[1]) and _is_index(view[2])
            and view[1] + view[2] <= numel):
      raise ConversionError(f'{self.path}: storage view {view!r} of {key} '
                            'is malformed')
    return _Storage(key, dtype, view[1], view[2])


def _zip_contents(archive: zipfile.ZipFile, path: str):
  """The unpickled object of a zip-format file (torch >= 1.6) and a function
  that reads a storage's elements: `PREFIX/data.pkl` holds the object, and
  `PREFIX/data/KEY` each storage's raw elements."""
  pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
  if len(pickles) != 1:
    raise ConversionError(f'{path} is a zip file but not one torch.save '
                          'writes: it has no single */data.pkl')
  prefix = pickles[0][:-len('data.pkl')]
  if prefix + 'byteorder' in archive.namelist():
    order = archive.read(prefix + 'byteorder').decode(errors='replace')
    if order != 'little':
      raise ConversionError(f'{path} was saved {order}-endian; only '
                            'little-endian files are read')
  with archive.open(pickles[0]) as f:
    obj = _unpickle(_TensorUnpickler(f, path))

  def read(storage: _Storage) -> np.ndarray:
    name = f'{prefix}data/{storage.key}'
    try:
      raw = archive.read(name)
    except KeyError:
      raise ConversionError(f'{path} lacks {name}, a storage its pickle '
                            'names') from None
    return np.frombuffer(raw, storage.dtype,
                         count=len(raw) // storage.dtype.itemsize)

  return obj, read


def _legacy_contents(f, path: str):
  """The same for the legacy format: the magic number, protocol version and
  system information pickled first, then the object, the list of storage
  keys, and each storage as its int64 element count and raw elements."""
  try:
    magic = _TensorUnpickler(f, path).load()
  except Exception:  # arbitrary bytes fail in many ways
    magic = None
  if magic != _LEGACY_MAGIC:
    raise ConversionError(f'{path} is not a PyTorch checkpoint: neither the '
                          'zip file of torch.save nor its legacy format')
  _unpickle(_TensorUnpickler(f, path))  # the protocol version
  info = _unpickle(_TensorUnpickler(f, path))
  unpickler = _TensorUnpickler(f, path)
  obj = _unpickle(unpickler)
  keys = _unpickle(_TensorUnpickler(f, path))
  if isinstance(info, dict) and not info.get('little_endian', True):
    raise ConversionError(f'{path} was saved big-endian; only little-endian '
                          'files are read')
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
    raise ConversionError(f'{path}: the list of storages is malformed')
  # Where each storage's elements start, found by skipping over them.
  places = {}
  for key in keys:
    header = f.read(8)
    numel = struct.unpack('<q', header)[0] if len(header) == 8 else -1
    if numel < 0 or key not in unpickler.dtypes:
      raise ConversionError(f'{path} is truncated or damaged at storage '
                            f'{key}')
    places[key] = (f.tell(), numel)
    f.seek(numel * unpickler.dtypes[key].itemsize, os.SEEK_CUR)

  def read(storage: _Storage) -> np.ndarray:
    if storage.key not in places:
      raise ConversionError(f'{path} lacks storage {storage.key}, which its '
                            'pickle names')
    start, numel = places[storage.key]
    f.seek(start)
    raw = f.read(numel * storage.dtype.itemsize)
    elements = np.frombuffer(raw, storage.dtype,
                             count=len(raw) // storage.dtype.itemsize)
    return elements[storage.start:storage.start + storage.numel]

  return obj, read


def _unpickle(unpickler: _TensorUnpickler):
  try:
    return unpickler.load()
  except ConversionError:
    raise
  except Exception as e:  # pickle reports damage as many kinds of error
    raise ConversionError(f'{unpickler.path} is a damaged PyTorch checkpoint:'
                          f' {type(e).__name__}: {e}') from e


def _state_dict(obj, path: str) -> dict[str, _Tensor]:
  if isinstance(obj, dict):
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(f'{path} holds {type(obj).__name__}, not a '
                          'state_dict (a dict of tensors)')
  not_tensors = [repr(k) for k, v in obj.items()
                 if not (isinstance(k, str) and isinstance(v, _Tensor))]
  if not_tensors:
    raise ConversionError(f'{path}: these entries of the state_dict are not '
                          f'named tensors: {", ".join(not_tensors)}')
  return {key.removeprefix('module.'): tensor for key, tensor in obj.items()}


def _array(tensor: _Tensor, elements: np.ndarray, path: str,
           name: str) -> np.ndarray:
  """The tensor's elements, as strided in its storage, copied."""
  if 0 in tensor.size:
    return np.zeros(tensor.size, elements.dtype)
  last = tensor.offset + sum((n - 1) * s
                             for n, s in zip(tensor.size, tensor.stride))
  if last >= elements.size:
    raise ConversionError(
        f'{path}: {name} reaches element {last} of a storage of '
        f'{elements.size}: the file is truncated or damaged')
  view = np.lib.stride_tricks.as_strided(
      elements[tensor.offset:], tensor.size,
      [s * elements.itemsize for s in tensor.stride], writeable=False)
  return view.copy()


def read_torch(path: str) -> dict[str, np.ndarray]:
  """The state_dict saved in `path` by torch.save, as NumPy arrays.

  Takes a plain state_dict or a checkpoint dict holding one under
  'state_dict' or 'model', and drops the 'module.' that DataParallel puts in
  front of every name.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist')
  with open(path, 'rb') as f:
    try:
      if zipfile.is_zipfile(f):
        obj, read = _zip_contents(zipfile.ZipFile(f), path)
      else:
        f.seek(0)
        obj, read = _legacy_contents(f, path)
      return {name: _array(tensor, read(tensor.storage), path, name)
              for name, tensor in _state_dict(obj, path).items()}
    except zipfile.BadZipFile as e:
      raise ConversionError(f'{path} is a damaged zip file: {e}') from e


# --- Caffe's .caffemodel, read without Caffe ---------------------------------

def _caffe_message_classes():
  """NetParameter, with just the caffe.proto fields that hold weights.

  Three generations of layer messages: LayerParameter (`layer`, 2015 on),
  V1LayerParameter (`layers`, bvlc_alexnet's), which may wrap the older
  V0LayerParameter. Unknown fields are skipped when parsing.
  """
  field = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(
      name='alexnet_jax/caffe_weights.proto', package='caffe', syntax='proto2')

  def message(name, *fields):
    m = proto.message_type.add(name=name)
    for field_name, number, kind, repeated in fields:
      f = m.field.add(name=field_name, number=number,
                      label=field.LABEL_REPEATED if repeated
                      else field.LABEL_OPTIONAL)
      if isinstance(kind, str):
        f.type, f.type_name = field.TYPE_MESSAGE, f'.caffe.{kind}'
      else:
        f.type = kind
      if repeated and not isinstance(kind, str):
        f.options.packed = True

  message('BlobShape', ('dim', 1, field.TYPE_INT64, True))
  message('BlobProto', ('num', 1, field.TYPE_INT32, False),
          ('channels', 2, field.TYPE_INT32, False),
          ('height', 3, field.TYPE_INT32, False),
          ('width', 4, field.TYPE_INT32, False),
          ('data', 5, field.TYPE_FLOAT, True),
          ('shape', 7, 'BlobShape', False),
          ('double_data', 8, field.TYPE_DOUBLE, True))
  message('V0LayerParameter', ('name', 1, field.TYPE_STRING, False),
          ('blobs', 50, 'BlobProto', True))
  message('V1LayerParameter', ('layer', 1, 'V0LayerParameter', False),
          ('name', 4, field.TYPE_STRING, False),
          ('blobs', 6, 'BlobProto', True))
  message('LayerParameter', ('name', 1, field.TYPE_STRING, False),
          ('blobs', 7, 'BlobProto', True))
  message('NetParameter', ('name', 1, field.TYPE_STRING, False),
          ('layers', 2, 'V1LayerParameter', True),
          ('layer', 100, 'LayerParameter', True))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName('caffe.NetParameter'))


def _blob_array(blob, path: str, name: str) -> np.ndarray:
  if blob.HasField('shape'):
    shape = tuple(blob.shape.dim)
  else:
    shape = (blob.num, blob.channels, blob.height, blob.width)
  values = blob.data if len(blob.data) else blob.double_data
  if min(shape, default=0) < 0 or len(values) != np.prod(shape,
                                                         dtype=np.int64):
    raise ConversionError(f'{path}: {name} holds {len(values)} values but '
                          f'its shape is {shape}')
  return np.array(values, np.float32).reshape(shape)


def read_caffe(path: str) -> dict[str, np.ndarray]:
  """Every blob of every layer of a binary .caffemodel, named
  'LAYER blobs[i]'."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist')
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    net = _caffe_message_classes().FromString(raw)
  except Exception as e:  # protobuf's DecodeError, or one of its causes
    raise ConversionError(f'{path} is not a .caffemodel (a binary '
                          f'NetParameter): {e}') from e
  layers = [(layer.name, layer.blobs) for layer in net.layer]
  for layer in net.layers:
    if layer.HasField('layer'):
      layers.append((layer.layer.name, layer.layer.blobs))
    else:
      layers.append((layer.name, layer.blobs))
  blobs = {}
  for layer, layer_blobs in layers:
    for i, blob in enumerate(layer_blobs):
      name = f'{layer} blobs[{i}]'
      if name in blobs:
        raise ConversionError(f'{path} has two layers named {layer!r}')
      blobs[name] = _blob_array(blob, path, name)
  if not blobs:
    raise ConversionError(
        f'{path} holds no layer with weights: it is not a .caffemodel (a '
        'deploy .prototxt describes a network but holds no weights)')
  return blobs


# --- The mapping -------------------------------------------------------------

def _source_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape PyTorch and Caffe give a parameter of ours of `shape`."""
  if leaf == 'bias':
    return shape
  if len(shape) == 4:  # conv: (kh, kw, in, out) <- (out, in, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1]   # dense: (in, out) <- (out, in)


def _kernel(weight: np.ndarray, layer: str, pool5: int) -> np.ndarray:
  if weight.ndim == 4:
    return np.transpose(weight, (2, 3, 1, 0))
  if layer == 'fc6':
    # PyTorch and Caffe flatten pool5 as (channel, height, width), our model
    # as (height, width, channel): the same rows, reordered.
    outputs, inputs = weight.shape
    channels = inputs // (pool5 * pool5)
    return (weight.reshape(outputs, channels, pool5, pool5)
            .transpose(2, 3, 1, 0).reshape(inputs, outputs))
  return weight.T


def _params(config, source: dict[str, np.ndarray], names: dict[str, str],
            path: str) -> dict:
  """Our parameter tree from `source`, whose names for a layer's weight and
  bias are names[layer]['kernel'] and ['bias']; every missing, unexpected or
  misshapen entry is reported in one error."""
  variant = config.model.variant
  expected = runs.abstract_state(config)['params']
  pool5 = models.feature_map_sizes(validation.image_size(config),
                                   variant)['pool5']
  params, problems = {}, []
  for layer, leaves in expected.items():
    params[layer] = {}
    for leaf, like in leaves.items():
      name = names[layer][leaf]
      shape = _source_shape(leaf, tuple(like.shape))
      if name not in source:
        problems.append(f'{name} is missing ({layer} {leaf}, {shape})')
        continue
      value = source[name]
      if value.shape != shape:
        problems.append(f'{name} is {value.shape}, the {variant!r} model\'s '
                        f'{layer} {leaf} is {shape}')
        continue
      value = np.asarray(value, np.float32)
      params[layer][leaf] = np.ascontiguousarray(
          value if leaf == 'bias' else _kernel(value, layer, pool5))
  wanted = {name for leaves in names.values() for name in leaves.values()}
  problems += [f'{name} is not a parameter of the {variant!r} model'
               for name in source if name not in wanted]
  if problems:
    raise ConversionError(f'{path} does not hold the {variant!r} network: '
                          + '; '.join(problems))
  return params


def _num_classes(source: dict[str, np.ndarray], name: str) -> int:
  """fc8's outputs, so fine-tuned networks with other classes convert; when
  fc8 is absent or malformed, 1000, and the check reports it."""
  weight = source.get(name)
  if weight is not None and weight.ndim >= 2 and weight.shape[-2] > 0:
    return int(weight.shape[-2])
  return 1000


def torchvision_config(num_classes: int = 1000):
  """The config of torchvision's AlexNet, trained by its reference recipe:
  SGD with PyTorch's momentum, batch 256, lr 0.01 divided by 10 every 30
  epochs, weight decay 1e-4 on every parameter, 90 epochs."""
  config = default.get_config()
  config.model.variant = 'owt'
  config.model.num_classes = num_classes
  config.dataset = 'imagenet2012'
  config.input.normalization = 'imagenet_mean_std'
  config.image_size = -1
  config.parallelism = 'none'
  config.num_devices = -1
  config.batch_size = 256
  config.optimizer.momentum_convention = 'torch'
  config.optimizer.weight_decay = 1e-4
  config.optimizer.decay_biases = True
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 30
  return config


def caffe_config(num_classes: int = 1000):
  """The config of bvlc_alexnet: its LRN constants, and its solver: batch
  256, lr 0.01 divided by 10 every 100,000 iterations (20 epochs), 450,000
  iterations (90 epochs), weight decay 5e-4 on weights only."""
  config = default.get_config()
  config.model.variant = 'original'
  config.model.num_classes = num_classes
  # Caffe's LRN divides alpha by local_size, and its k defaults to 1. Its
  # window spans both columns' maps, where the paper's stops at the column
  # boundary.
  config.model.lrn_across_columns = True
  config.model.lrn_n = 5
  config.model.lrn_k = 1.0
  config.model.lrn_alpha = 1e-4 / 5
  config.model.lrn_beta = 0.75
  config.dataset = 'imagenet2012'
  # Caffe subtracts its own ImageNet mean image; the store's is the same
  # statistic of the same training images.
  config.input.normalization = 'mean_image'
  config.image_size = -1
  config.parallelism = 'none'
  config.num_devices = -1
  config.batch_size = 256
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 20
  return config


def from_torchvision(state_dict: dict[str, np.ndarray],
                     path: str = 'the state_dict'):
  """(config, parameter tree) of the 'owt' model holding `state_dict`.

  torchvision's AdaptiveAvgPool2d((6, 6)) after pool5 has no parameters and
  is the identity at 224x224 input, the size the converted run takes.
  """
  names = {layer: {'kernel': f'{prefix}.weight', 'bias': f'{prefix}.bias'}
           for layer, prefix in TORCHVISION_LAYERS.items()}
  config = torchvision_config(
      _num_classes(state_dict, names['fc8']['kernel']))
  return config, _params(config, state_dict, names, path)


def from_caffe(blobs: dict[str, np.ndarray], path: str = 'the caffemodel'):
  """(config, parameter tree) of the 'original' model holding bvlc_alexnet's
  blobs, with conv1 turned to take RGB instead of Caffe's BGR."""
  names = {layer: {'kernel': f'{name} blobs[0]', 'bias': f'{name} blobs[1]'}
           for layer, name in CAFFE_LAYERS.items()}
  expected_ndim = {name: 1 if leaf == 'bias' else
                   (4 if layer in models.CONV_LAYERS else 2)
                   for layer, leaves in names.items()
                   for leaf, name in leaves.items()}
  # Caffe's older blobs are always 4-D (num, channels, height, width): an FC
  # weight is (1, 1, out, in) and a bias (1, 1, 1, out).
  blobs = {name: _squeeze_leading(value, expected_ndim.get(name, value.ndim))
           for name, value in blobs.items()}
  config = caffe_config(_num_classes(blobs, names['fc8']['kernel']))
  params = _params(config, blobs, names, path)
  params['conv1']['kernel'] = np.ascontiguousarray(
      params['conv1']['kernel'][:, :, ::-1, :])
  return config, params


def _squeeze_leading(value: np.ndarray, ndim: int) -> np.ndarray:
  while value.ndim > ndim and value.shape[0] == 1:
    value = value[0]
  return value


def convert(workdir: str, *, torchvision: str | None = None,
            caffe: str | None = None):
  """Writes the weights in `torchvision` or `caffe` as a run in `workdir`;
  returns its config. Nothing is written unless every weight fits."""
  if (torchvision is None) == (caffe is None):
    raise ConversionError('give one of --torchvision and --caffe')
  if torchvision is not None:
    config, params = from_torchvision(read_torch(torchvision), torchvision)
  else:
    config, params = from_caffe(read_caffe(caffe), caffe)
  runs.write(workdir, config, params)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax logs every file it writes at INFO; the result is what matters here.
  logging.set_verbosity(logging.WARNING)
  try:
    config = convert(FLAGS.workdir, torchvision=FLAGS.torchvision,
                     caffe=FLAGS.caffe)
  except (ConversionError, OSError, checkpointing.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  source = 'torchvision' if FLAGS.torchvision else 'Caffe'
  print(f'{FLAGS.workdir}: {source} weights as a step-0 run of the '
        f'{config.model.variant!r} model, {config.model.num_classes} classes, '
        f'input.normalization={config.input.normalization!r}. Evaluate with '
        f'python -m alexnet_jax.evaluate --workdir={FLAGS.workdir} '
        '--store_dir=STORE')


if __name__ == '__main__':
  # Defined here, not on import, so that tests import this module beside the
  # other command-line modules, which define --workdir too.
  flags.DEFINE_string('torchvision', None, 'A torchvision AlexNet state_dict '
                      '(.pth, as torch.save writes it).')
  flags.DEFINE_string('caffe', None, 'Caffe\'s bvlc_alexnet.caffemodel, or '
                      'a network of the same shape.')
  flags.DEFINE_string('workdir', None, 'The run to write; it must not hold '
                      'checkpoints yet.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
