"""Tests run on the CPU with 8 simulated devices, set before JAX starts.

Compilation dominates a CPU test of a small network, so XLA's optimisation
passes are mostly switched off: results are the same function, computed
sooner. And one test run compiles once what it compiles many times: the
pytest workers and every command a test starts (tests/commands.py passes the
environment on) share JAX's persistent compilation cache, in a directory made
for this run and removed after it. A cached executable is the one XLA
compiled, so every result is the same.
"""

import os
import shutil
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Set by the first process of the run (the xdist controller); its workers
# inherit it. The default floor of 1 s would leave out the many small
# functions a command compiles.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='alexnet_jax_test_compilations_')
  os.environ['ALEXNET_JAX_TEST_CACHE_OWNER'] = str(os.getpid())
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_disable_most_optimizations', True)


# The files that take longest, first: under pytest-xdist each file goes whole
# to one worker (--dist loadfile), and one that started last would leave the
# other worker idle at the end.
SLOWEST_FIRST = ('test_kill_resume.py', 'test_lost_host.py',
                 'test_multiprocess.py', 'test_parallel.py', 'test_prepare.py')


def pytest_unconfigure(config):
  del config
  if os.environ.get('ALEXNET_JAX_TEST_CACHE_OWNER') == str(os.getpid()):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(
        SLOWEST_FIRST)
  items.sort(key=rank)  # stable: each file keeps its own order
