"""The original 2012 network on one device, with the paper's recipe.

    python -m alexnet_jax.main --config=configs/one_gpu.py --workdir=/tmp/one_gpu

ImageNet, 90 epochs, batch 128; the two columns become grouped convolutions and
LRN is applied per column, so this is the same function as configs/two_gpu.py.
The paper reports 40.7% / 18.2% top-1 / top-5 validation error.

    python -m alexnet_jax.main --config=configs/one_gpu.py:digits --workdir=/tmp/digits

trains a quarter-width copy on the embedded digits: about 97-99% validation
top-1 in under 5 minutes on 2 CPU cores (see README.md for measured figures).
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.parallelism = 'none'
  return c
