"""The arithmetic of one training image, layer by layer.

A layer's forward pass is `macs` multiply-adds per image (a convolution:
output pixels x kernel taps x input channels per group x output channels,
padding taps included; a dense layer: inputs x outputs). Training costs three
times that, in FLOPs of two per multiply-add: the forward pass, the gradient of
the weights and the gradient of the layer's input; conv1's input is the image,
whose gradient nobody needs. Biases, ReLUs, LRN, pooling and the optimizer are
left out (a few percent, memory-bound). `tests/test_benchmark.py` checks the
total against XLA's own count for the compiled train step.
"""

from __future__ import annotations

import dataclasses

from alexnet_jax import models


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  macs: int             # forward multiply-adds per image
  input_gradient: bool  # whether training computes the gradient of its input

  @property
  def training_flops(self) -> int:
    passes = 3 if self.input_gradient else 2
    return 2 * passes * self.macs


def layer_table(model: models.AlexNet, image_size: int) -> list[Layer]:
  """Every conv and FC layer of the whole (single-device) network."""
  arch = model.arch
  sizes = models.feature_map_sizes(image_size, model.variant,
                                   model.pool_window, model.pool_stride)
  c1, c2, c3, c4, c5 = (model.scaled(f) for f in arch.conv_features)
  groups = arch.columns
  fc = model.scaled(arch.fc_features)
  # (name, output size, kernel, input channels, output channels, groups)
  convs = [('conv1', sizes['conv1'], 11, 3, c1, 1),
           ('conv2', sizes['conv2'], 5, c1, c2, groups),
           ('conv3', sizes['conv3'], 3, c2, c3, 1),
           ('conv4', sizes['conv4'], 3, c3, c4, groups),
           ('conv5', sizes['conv5'], 3, c4, c5, groups)]
  table = [Layer(name, size * size * k * k * (c_in // g) * c_out,
                 input_gradient=name != 'conv1')
           for name, size, k, c_in, c_out, g in convs]
  dense = [('fc6', sizes['pool5'] ** 2 * c5, fc), ('fc7', fc, fc),
           ('fc8', fc, model.num_classes)]
  table += [Layer(name, n_in * n_out, input_gradient=True)
            for name, n_in, n_out in dense]
  return table


def forward_macs(model: models.AlexNet, image_size: int) -> int:
  return sum(layer.macs for layer in layer_table(model, image_size))


def training_flops(model: models.AlexNet, image_size: int) -> int:
  """FLOPs of one image's forward and backward pass (the model FLOPs of MFU)."""
  return sum(layer.training_flops for layer in layer_table(model, image_size))
