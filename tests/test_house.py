"""The shape of the code base: imports go one way (no circles; `train/` imports nothing above it), no
function in `udi_jax/` is longer than a screen (60 lines), and the benchmarks use the package, never the
tests."""

import ast
import pathlib

from tests.helpers import REPO

PACKAGE = REPO / 'udi_jax'
# Each layer imports only from the layers before it (and from within its own package).
LAYERS = (
    ('errors', 'mesh', 'rng', 'say'),        # leaves
    ('models',),                             # what the networks are
    ('method', 'data', 'interop'),           # the paper; what enters; PyTorch layouts
    ('evaluate',),                           # what a network learned
    ('train',),                              # how it learns (runs k-NN during training)
    ('main', 'export', 'benchmark', 'sweep', 'parity'),   # entry points and the parity checks' inputs
    ('estimate',),                           # time and memory from the step's XLA analyses
    ('reproduce',),                          # the Imagenette reproduction's parts
)
MAX_FUNCTION_LINES = 60


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """Module -> the udi_jax modules it imports, at the top or inside functions."""
  modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('udi_jax'):
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          targets.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        targets |= {a.name for a in node.names if a.name.startswith('udi_jax')}
    graph[name] = targets - {name}
  return graph


def layer_of(module: str) -> int:
  part = module.split('.')[1]
  for i, layer in enumerate(LAYERS):
    if part in layer:
      return i
  raise AssertionError(f'{module} belongs to no layer of tests/test_house.py: add its package to LAYERS')


def find_cycle(graph: dict[str, set[str]]):
  """One import circle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_imports_go_one_way():
  graph = import_graph()
  assert 'udi_jax.train.loop' in graph and 'udi_jax.method.objective' in graph
  assert find_cycle(graph) is None, f'import circle: {" -> ".join(find_cycle(graph))}'
  upward = [f'{a} imports {b}' for a, targets in graph.items() for b in targets
            if a.split('.')[1] != b.split('.')[1] and layer_of(b) >= layer_of(a)]
  assert not upward, upward


def test_the_checks_can_fail():
  """The detectors themselves: a circle and an upward import are found."""
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None
  assert layer_of('udi_jax.train.loop') > layer_of('udi_jax.evaluate.run') > layer_of('udi_jax.models.vit')


def test_no_function_is_longer_than_a_screen():
  long = []
  for path in PACKAGE.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f'{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)')
  assert not long, long


def modules_imported(path: pathlib.Path) -> set[str]:
  """The top-level names of every module a file imports, at the top or inside functions."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split('.')[0])
    elif isinstance(node, ast.Import):
      names |= {a.name.split('.')[0] for a in node.names}
  return names


def test_benchmarks_import_no_test_module_and_patch_no_path():
  scripts = sorted((REPO / 'benchmarks').glob('*.py'))
  assert len(scripts) >= 4
  importing = [p.name for p in scripts if 'tests' in modules_imported(p)]
  assert not importing, f'benchmarks importing the tests: {importing}'
  patching = [p.name for p in scripts if 'sys.path' in p.read_text()]
  assert not patching, f'benchmarks patching sys.path: {patching}'
  assert 'tests' in modules_imported(REPO / 'tests' / 'test_house.py')      # the detector sees `from tests...`
