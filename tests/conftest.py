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


# The files that take longest, first: under pytest-xdist each file goes whole
# to one worker (--dist loadfile), and one that started last would leave the
# other worker idle at the end.
SLOWEST_FIRST = ('test_kill_resume.py', 'test_lost_host.py',
                 'test_multiprocess.py', 'test_parallel.py', 'test_prepare.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(
        SLOWEST_FIRST)
  items.sort(key=rank)  # stable: each file keeps its own order
