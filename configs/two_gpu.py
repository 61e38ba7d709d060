"""The paper's setting: the two-column network, one column per device.

    python -m alexnet_jax.main --config=configs/two_gpu.py --workdir=/tmp/two_gpu

Each of 2 devices holds half the kernels of every conv layer and half the
neurons of every FC layer; they exchange activations at conv3's input, at
fc6's input and between the FC layers (section 3.2). ImageNet, 90 epochs,
batch 128; the paper reports 40.7% / 18.2% top-1 / top-5 validation error.
On a machine with no accelerator two CPU devices are simulated, so

    python -m alexnet_jax.main --config=configs/two_gpu.py:digits --workdir=/tmp/digits2

runs the same scheme on the embedded digits on a laptop.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model.variant = 'original'
  c.parallelism = 'two_column'
  c.num_devices = 2
  c.cpu_devices = 2
  return c
