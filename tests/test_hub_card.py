"""hf_hybrid_attn.hub.card (and the hub package around it) stays light: no torch, no transformers at import.

The card is rendered and checked offline from plain dicts, so tools that only write or lint cards
need neither. The AST test checks the modules' own top-level imports (and, transitively, those of
the package modules they import); the subprocess test checks the real import.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_hybrid_attn"
HEAVY = {"torch", "transformers"}


def _top_level_imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of each import statement outside functions and classes; level 0 = absolute."""
    found: list[tuple[int, str]] = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((0, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.module:
                    found.append((node.level, node.module))
                else:  # from . import a, b
                    found.extend((node.level, a.name) for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):  # still module level
                visit(node.body + node.orelse + getattr(node, "finalbody", [])
                      + [s for h in getattr(node, "handlers", []) for s in h.body])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _resolve(path: Path, level: int, module: str) -> Path | None:
    """The file of a relative import inside the package, or None (a package's attribute, not a file)."""
    base = path.parent
    for _ in range(level - 1):
        base = base.parent
    target = base.joinpath(*module.split("."))
    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_card_module_imports_neither_torch_nor_transformers():
    todo = [PACKAGE / "hub" / "card.py", PACKAGE / "hub" / "__init__.py"]
    seen: set[Path] = set()
    heavy: list[str] = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for level, module in _top_level_imports(path):
            if level == 0:
                if module.split(".")[0] in HEAVY:
                    heavy.append(f"{path.relative_to(PACKAGE.parent)}: import {module}")
                assert module.split(".")[0] != "hf_hybrid_attn", f"{path}: absolute import of {module}"
                continue
            target = _resolve(path, level, module)
            assert target is not None and PACKAGE in target.parents, f"{path}: cannot resolve {'.' * level}{module}"
            todo.append(target)
    assert PACKAGE / "families.py" in seen  # the walk did follow the relative imports
    assert heavy == [], heavy


def _imports_torch(code: str) -> list[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_card_import_loads_neither_torch_nor_transformers():
    assert _imports_torch("import hf_hybrid_attn") == []  # the package __init__ is lazy
    assert _imports_torch("import hf_hybrid_attn.hub.card") == []
    # the whole hub package (push, export, the CLI) imports them only when a function runs
    assert _imports_torch("import hf_hybrid_attn.hub, hf_hybrid_attn.hub.cli") == []
