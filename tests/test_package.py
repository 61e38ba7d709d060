"""The package's shape: each module sits at one level of the import graph,
and the requirements files that install it agree with each other."""

import ast
import glob
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'alexnet_jax')


def _imports(path: str) -> set[str]:
  """The package's modules that `path` imports, at its top or in a function."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'alexnet_jax':
        found.update(alias.name for alias in node.names)
      elif node.module.startswith('alexnet_jax.'):
        found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found.update(alias.name.split('.')[1] for alias in node.names
                   if alias.name.startswith('alexnet_jax.'))
  return found


def test_no_import_cycles():
  modules = {os.path.basename(p)[:-3]: p
             for p in glob.glob(os.path.join(PACKAGE, '*.py'))}
  # A module importing itself (prepare does, so that worker processes
  # unpickle its functions by their module's name) is no cycle.
  graph = {m: (_imports(p) & set(modules)) - {m} for m, p in modules.items()}
  assert {'data', 'imagenet', 'runs', 'train'} <= set(graph)
  cycles = []
  for start in graph:
    stack = [(start, [start])]
    while stack:
      node, path = stack.pop()
      for dep in graph[node]:
        if dep == start:
          cycles.append(' -> '.join(path + [dep]))
        elif dep not in path:
          stack.append((dep, path + [dep]))
  assert not cycles, cycles


def _pins(name: str) -> dict[str, str]:
  """package -> its requirement in the repository's requirements file."""
  pins = {}
  for line in open(os.path.join(os.path.dirname(PACKAGE), name)):
    line = line.split('#')[0].strip()
    if line and not line.startswith('-'):
      package = line.split(';')[0]
      for mark in '=<>!~[':
        package = package.split(mark)[0]
      pins[package.strip().lower()] = line
  return pins


def test_the_peers_environment_measures_the_tests_packages():
  # The input peers run in an environment of their own
  # (requirements-peers.txt): what it shares with the test requirements
  # must be the same releases, so that tf.data and OpenCV are timed as the
  # tests use them. PyTorch alone differs: the peers take a release with a
  # torchvision built against it.
  peers, tests = _pins('requirements-peers.txt'), _pins(
      'requirements-test.txt')
  assert {'tensorflow-cpu', 'opencv-python-headless', 'torch',
          'torchvision'} <= set(peers)
  shared = (set(peers) & set(tests)) - {'torch'}
  assert {'tensorflow-cpu', 'opencv-python-headless'} <= shared
  for package in shared:
    assert peers[package] == tests[package], package
