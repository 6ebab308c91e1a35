"""The package's structure, read from its source with ``ast``: the layer rule of docs/design.md section 2 (a module
imports only from its own layer or a lower one), no import cycle, no private name taken from another module, no
module of ``empssl/`` longer than the limit, a top level of about a dozen modules, and ``kernels/`` a leaf.

How imports are counted: every ``import`` statement is an edge, at module level or inside a function (a lazy import
only defers a dependency; a cycle through one is still a cycle). ``from . import x`` is an edge to the submodule x
when it is one, else to the package. The parent packages Python imports on the way (``empssl``, ``empssl.ops``) are
not edges: every module would otherwise depend on ``empssl/__init__.py``.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"empssl": ROOT / "empssl", "empssl.kernels": ROOT / "kernels"}  # kernels/ installs as empssl.kernels
MAX_LINES = 450
MAX_TOP_LEVEL_MODULES = 12  # empssl/*.py, __init__ and __main__ included; the rest lives in subpackages
# the layers of docs/design.md section 2, lowest first: the longest matching prefix names a module's layer
LAYERS = {
    "empssl.checks": 0,
    "empssl.files": 0,
    "empssl._build_info": 0,
    "empssl.augment.params": 0,
    "empssl.augment.config": 0,
    "empssl.kernels": 0,
    "empssl.backends": 1,
    "empssl.device": 1,
    "empssl.distributed": 1,
    "empssl.checkpoint": 1,
    "empssl.reference": 1,
    "empssl.ops": 2,
    "empssl.augment": 3,
    "empssl.loss": 3,
    "empssl.optim": 3,
    "empssl.models": 3,
    "empssl.data": 3,
    "empssl.config": 4,
    "empssl.options": 4,
    "empssl.training": 5,
    "empssl.evaluation": 5,
    "empssl.reproduce": 6,
    "empssl.bench": 6,
    "empssl.viz": 6,
    "empssl.cli": 7,
    "empssl.__main__": 7,
    "empssl": 7,
}
# the one module of the package that the kernels read: the parameter layout, itself importing nothing (setup.py loads
# it alone to generate csrc/include/augment_layout.h)
KERNEL_IMPORTS_ALLOWED = {"empssl.augment.params"}


def _modules():
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _imports(module, path):
    """(imported module, imported name or None, line) for every import of an empssl module in ``path``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("empssl"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append(
                    (submodule, None, node.lineno) if submodule in MODULES else (target, alias.name, node.lineno)
                )
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("empssl")]
    return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def _layer(module):
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_the_graph_is_read():
    assert {
        "empssl.training.loop",
        "empssl.training.step",
        "empssl.device",
        "empssl.training.run_folder",
        "empssl.kernels.tcr",
    } <= set(MODULES)
    assert {"empssl.training.step", "empssl.training.run_folder", "empssl.device"} <= {
        target for target, _, _ in IMPORTS["empssl.training.loop"]
    }


def test_every_module_has_a_layer_and_imports_only_from_its_own_or_lower_layers():
    upward = [
        f"{module} (layer {_layer(module)}):{line} imports {target} (layer {_layer(target)})"
        for module, imports in IMPORTS.items()
        for target, name, line in imports
        if target.startswith("empssl")
        and _layer(target) > _layer(module)
        and not (target == "empssl" and name in ("__version__", None))
    ]  # the version: the package's metadata
    assert not upward, upward


def test_modules_import_names_from_the_module_that_defines_them_not_through_a_package():
    def defined(path):  # names a package's __init__ defines itself (not re-exports)
        tree = ast.parse(path.read_text())
        return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))} | {
            target.id
            for node in tree.body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }

    packages = {module: defined(path) for module, path in MODULES.items() if path.name == "__init__.py"}
    through = [
        f"{module}:{line} imports {name} from the package {target}"
        for module, imports in IMPORTS.items()
        if MODULES[module].name != "__init__.py" and module != "empssl.__main__"
        for target, name, line in imports
        if target in packages and name and name not in packages[target]
    ]
    assert not through, through


def test_the_top_level_holds_about_a_dozen_modules():
    top = sorted(path.name for path in PACKAGES["empssl"].glob("*.py") if path.name != "_build_info.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_import_cycle():
    graph = {
        module: sorted({target for target, _, _ in imports if target in MODULES and target != module})
        for module, imports in IMPORTS.items()
    }
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, cycles


def test_no_private_name_is_taken_from_another_module():
    taken = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        taken += [
            f"{module}:{line} imports {name} from {target}"
            for target, name, line in IMPORTS[module]
            if name and _private(name) and target != module
        ]
        # module._name, where module was bound by an import of an empssl module
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("empssl")):
                aliases |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {
                    alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name.startswith("empssl")
                }
        taken += [
            f"{module}:{node.lineno} reads {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ]
    assert not taken, taken


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith("empssl.kernels")])
def test_no_module_of_the_package_is_longer_than_the_limit(module):
    # kernels/ is exempt: one file per op holds its Triton kernel, launcher and checks (docs/design.md section 8, the
    # Liger-Kernel style)
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"


def test_kernels_are_a_leaf():
    outside = [
        f"{module}:{line} imports {target}"
        for module, imports in IMPORTS.items()
        if module.startswith("empssl.kernels")
        for target, _, line in imports
        if not target.startswith("empssl.kernels") and target not in KERNEL_IMPORTS_ALLOWED
    ]
    assert not outside, outside
    for allowed in KERNEL_IMPORTS_ALLOWED:
        assert IMPORTS[allowed] == [], f"{allowed} must import nothing of the package"


def test_one_cuda_graph_capture_helper():
    capturing = [
        module
        for module, path in MODULES.items()
        if "torch.cuda.graph(" in path.read_text() or "CUDAGraph(" in path.read_text()
    ]
    assert capturing == ["empssl.device"], capturing
