"""The parallel schemes: which mesh axis splits what, and where activations meet.

A scheme is a description, not code: a 2-D mesh with axes ('data', 'model'),
the partition spec of the batch, the partition spec of every parameter, and the
partition fields that make `AlexNet` build one device's share of the network.
The train step (`alexnet_jax.train`) runs the model under `jax.shard_map` with
these specs; the model's own collectives move the activations.

  none         one device.
  data         parameters replicated, the batch split over every device.
  two_column   Krizhevsky et al. 2012: the 'model' axis (size 2) holds the two
               columns; each device has half the kernels of every conv layer and
               half the neurons of every FC layer and sees its whole batch.
               Activations cross at conv3's input, at fc6's input and between
               FC layers. A 'data' axis replicates the pair.
  weird_trick  Krizhevsky 2014: conv layers data parallel over all devices, FC
               layers model parallel over the same devices, fed by gathering
               every device's conv5 features.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alexnet_jax import models

SCHEMES = ('none', 'data', 'two_column', 'weird_trick')
DATA, MODEL = 'data', 'model'
ALL_AXES = (DATA, MODEL)


def mesh_shape(parallelism: str, num_devices: int,
               requested: tuple[int, ...] = ()) -> tuple[int, int]:
  """(data, model) sizes: the config's `mesh_shape` with -1 filled in, or the
  scheme's default layout of `num_devices`."""
  if parallelism == 'none':
    default = (1, 1)
  elif parallelism == 'two_column':
    default = (-1, 2)
  else:
    default = (-1, 1)
  shape = tuple(requested) or default
  if len(shape) != 2:
    raise ValueError(f'config.mesh_shape must have two entries (data, model), '
                     f'got {tuple(requested)}')
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh_shape may have one -1, got {shape}')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f'config.mesh_shape={shape} does not divide '
                       f'{num_devices} devices')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  return shape  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Scheme:
  name: str
  mesh: Mesh
  # Mesh axes that split the batch the train step is fed.
  batch_axes: tuple[str, ...]
  # Partition fields handed to `AlexNet` inside shard_map.
  model_fields: dict[str, Any]

  @property
  def batch_spec(self) -> P:
    return P(self.batch_axes) if self.batch_axes else P()

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  def param_spec(self, path: tuple[str, ...], ndim: int,
                 fc8_sharded: bool) -> P:
    """Spec of one parameter: sharded on its output-feature (last) axis or not."""
    layer = path[0]
    if self.name == 'two_column':
      split = layer != 'fc8' or fc8_sharded
      axis = MODEL
    elif self.name == 'weird_trick':
      split = layer in ('fc6', 'fc7') or (layer == 'fc8' and fc8_sharded)
      axis = ALL_AXES
    else:
      split = False
      axis = None
    if not split:
      return P()
    return P(*([None] * (ndim - 1)), axis)

  def param_specs(self, params, model: models.AlexNet):
    fc8_sharded = self.local_model(model).fc8_is_sharded()
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: self.param_spec(
            tuple(k.key for k in path), np.ndim(leaf), fc8_sharded), params)

  def local_model(self, model: models.AlexNet) -> models.AlexNet:
    """This device's share of `model`, for use inside shard_map."""
    return model.clone(**self.model_fields)

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)


def make_scheme(parallelism: str, devices, requested_shape=()) -> Scheme:
  if parallelism not in SCHEMES:
    raise ValueError(f'config.parallelism must be one of {SCHEMES}, '
                     f'got {parallelism!r}')
  devices = list(devices)
  if parallelism == 'none':
    devices = devices[:1]
  shape = mesh_shape(parallelism, len(devices), requested_shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f'config.mesh_shape={shape} needs {math.prod(shape)} '
                     f'devices, {len(devices)} are in use')
  if parallelism == 'two_column' and shape[1] != 2:
    raise ValueError(f"parallelism='two_column' needs a 'model' axis of 2 (one "
                     f'device per column), got config.mesh_shape={shape}')
  if parallelism == 'data' and shape[1] != 1:
    raise ValueError(f"parallelism='data' needs a 'model' axis of 1, got "
                     f'config.mesh_shape={shape}')
  mesh = jax.make_mesh(shape, ALL_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)
  if parallelism == 'two_column':
    fields = dict(column_axis=MODEL, column_shards=2, fc_axis=MODEL,
                  fc_shards=2)
    batch_axes = (DATA,)
  elif parallelism == 'weird_trick':
    n = math.prod(shape)
    fields = dict(fc_axis=ALL_AXES, fc_shards=n, batch_axis=ALL_AXES)
    batch_axes = ALL_AXES
  else:
    fields = {}
    batch_axes = ALL_AXES
  return Scheme(parallelism, mesh, batch_axes, fields)


def device_index():
  """This device's position in the mesh, inside shard_map.

  Folded into the dropout key so that no two devices (column halves or batch
  shards) draw the same mask.
  """
  return jax.lax.axis_index(ALL_AXES)
