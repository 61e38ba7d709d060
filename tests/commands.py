"""The environment in which tests run the project's commands as children."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_env(**extra: str) -> dict[str, str]:
  """This process's environment for a command: the CPU, XLA's optimisation
  passes off as in conftest.py (they cost more than they save on runs this
  short), the repository importable, and no forced device count (a command's
  config asks runtime.setup for its own); then `extra`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_DISABLE_MOST_OPTIMIZATIONS='true', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env.update(extra)
  return env
