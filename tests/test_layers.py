"""The package's layers: no module imports (at the top or inside a function) from a layer
above its own. Lowest first: config -> sat -> model -> parallel -> checkpoint -> train ->
launch (errors and faults are below everything; data sits beside sat, eval beside checkpoint)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LEVEL = {"sat_dist.errors": 0, "sat_dist.faults": 0, "sat_dist.config": 1, "sat_dist.data": 2, "sat_dist.sat": 2,
         "sat_dist.model": 4, "sat_dist.parallel": 5, "sat_dist.checkpoint": 6, "sat_dist.eval": 6, "sat_dist.train": 7}


def _level(module: str) -> int:
    best = max((k for k in LEVEL if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module}: not in any layer; add it to tests/test_layers.py"
    return LEVEL[best]


def _imports(path: Path, module: str):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(module.split(".")[:-node.level] + [node.module])
            yield base
            yield from (f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in _modules())


def _modules() -> set[str]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "sat_dist").rglob("*.py")}


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sorted((REPO / "sat_dist").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if module == "sat_dist":
            continue
        for target in _imports(path, module):
            if target.startswith("sat_dist.") and _level(target) > _level(module):
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)
