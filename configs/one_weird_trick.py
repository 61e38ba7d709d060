"""Krizhevsky 2014, "One weird trick": the single-column network, conv layers
data parallel and FC layers model parallel over every local device.

    python -m alexnet_jax.main --config=configs/one_weird_trick.py --workdir=/tmp/owt

ImageNet, 90 epochs, batch 128 per 1 device scaled by the device count with the
conv learning rate scaled linearly (his configs). cuda-convnet2 reached 42.6% /
19.8% top-1 / top-5 error on one GPU; torchvision's weights of this layout
reach 43.5% / 20.9%. With no accelerator two CPU devices are simulated:

    python -m alexnet_jax.main --config=configs/one_weird_trick.py:digits --workdir=/tmp/owt_digits
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model.variant = 'owt'
  c.parallelism = 'weird_trick'
  c.optimizer.batch_scaling = 'linear_conv'
  c.optimizer.reference_batch_size = c.batch_size
  c.cpu_devices = 2
  return c
