"""The package's shape: each module sits at one level of the import graph."""

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
