"""Tests run on the CPU with 8 simulated devices, set before JAX starts.

Compilation dominates a CPU test of a small network, so XLA's optimisation
passes are mostly switched off: results are the same function, computed
sooner.
"""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_disable_most_optimizations', True)
