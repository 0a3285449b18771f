"""The import graph of jaxdiff/ is acyclic, function-level imports included (DESIGN.md: imports go down the layers;
no function-level import hides a cycle), and the graph this test builds sees the imports it must see."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxdiff')


def modules() -> dict[str, str]:
    """{'jaxdiff.a.b': path} for every .py under jaxdiff/ (a package is named by its __init__)."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return out


def imported(node: ast.AST, module: str, is_package: bool, known: dict[str, str]) -> list[str]:
    """The jaxdiff modules an import statement loads (``from pkg import sub`` counts sub, else pkg)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = module.split('.') if is_package else module.split('.')[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1]
        source = '.'.join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ''
    out = []
    for alias in node.names:
        if f'{source}.{alias.name}' in known:
            out.append(f'{source}.{alias.name}')
        elif source in known:
            out.append(source)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the jaxdiff modules it imports anywhere in its body}, a module's own parent packages excluded (they
    run before it whatever it imports)."""
    known = modules()
    graph = {m: set() for m in known}
    for module, path in known.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, module, path.endswith('__init__.py'), known):
                    if target != module and not module.startswith(target + '.'):
                        graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle [a, b, ..., a] of ``graph``, or [] when it is acyclic (iterative depth-first search)."""
    state = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return []


def test_the_graph_sees_top_level_and_function_level_imports():
    graph = import_graph()
    assert 'jaxdiff.transforms.base' in graph['jaxdiff.transforms.cfg']           # from a import b (module)
    assert 'jaxdiff.transforms.registry' in graph['jaxdiff.sampling.options']    # from pkg import submodule
    assert 'jaxdiff.data.augment' in graph['jaxdiff.tasks.denoiser']        # inside a function
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) == []


def test_jaxdiff_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


# DESIGN.md: core <- solvers/transforms/nets/data <- engine <- tasks <- sampling/evaluation <- CLIs.
_TRAINING_AND_UP = ('jaxdiff.engine', 'jaxdiff.tasks', 'jaxdiff.runs', 'jaxdiff.sampling', 'jaxdiff.evaluation')
ABOVE = {
    **{core: _TRAINING_AND_UP for core in ('jaxdiff.nets', 'jaxdiff.data', 'jaxdiff.transforms', 'jaxdiff.solvers',
                                           'jaxdiff.metrics')},
    'jaxdiff.engine': ('jaxdiff.tasks', 'jaxdiff.runs', 'jaxdiff.sampling', 'jaxdiff.evaluation'),
    'jaxdiff.tasks': ('jaxdiff.sampling', 'jaxdiff.evaluation'),
}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module from a layer above a's (:data:`ABOVE`)."""
    def within(name: str, package: str) -> bool:
        return name == package or name.startswith(package + '.')
    return sorted(f'{module} -> {target}' for module, targets in graph.items() for layer, above in ABOVE.items()
                  if within(module, layer) for target in targets if any(within(target, a) for a in above))


def test_imports_go_down_the_layers():
    assert upward_imports({'jaxdiff.engine.loop': {'jaxdiff.tasks.denoiser'}}) == \
        ['jaxdiff.engine.loop -> jaxdiff.tasks.denoiser']
    assert upward_imports(import_graph()) == []
