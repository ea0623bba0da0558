"""The import graph of the package has no upward arrow: each module imports only modules of its own or a lower
floor (every import counts, including those inside functions)."""

import ast
from pathlib import Path

import frugalseg

ROOT = Path(frugalseg.__file__).resolve().parent

# floors, lowest first; a module may import its own floor or a lower one
FLOORS = [
    {"errors", "files", "config", "registry", "hardware", "collectives"},  # ground: no project knowledge
    {"data", "nn", "losses"},  # library: images, networks, loss functions
    {"methods", "engine"},  # methods (never the engine) and the one training loop (never a method)
    {"eval"},  # applying trained models: metrics, inference, evaluation, prediction, export, plots
    {"recipes", "assemble", "run", "benchmark", "profile", "curves"},  # orchestrators
    {"cli", "__main__"},
]
FORBIDDEN = {("methods", "engine"), ("engine", "methods"), ("losses", "engine"), ("losses", "methods")}


def _unit(module: str) -> str:
    """``frugalseg.data.readers`` -> ``data``; ``frugalseg`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(unit: str) -> int:
    if unit == "__init__":
        return 0
    return next(i for i, units in enumerate(FLOORS) if unit in units)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("frugalseg"):
            if node.module != "frugalseg":
                out.add(node.module)
            else:  # ``from frugalseg import engine`` names a module; ``__version__`` is the package's own
                out.update(f"frugalseg.{a.name}" for a in node.names
                           if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("frugalseg"))
    return out


def test_every_module_belongs_to_a_floor():
    for path in ROOT.rglob("*.py"):
        unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if unit != "__init__":
            _floor(unit)  # raises StopIteration for a module no floor names


def test_no_module_imports_a_higher_floor_and_methods_and_losses_never_import_the_engine():
    wrong = []
    for path in ROOT.rglob("*.py"):
        unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for target in _imports(path):
            other = _unit(target)
            if other in ("__init__", unit):
                continue
            if _floor(other) > _floor(unit) or (unit, other) in FORBIDDEN:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "\n".join(wrong)
