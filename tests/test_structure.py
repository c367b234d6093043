"""The package's layering (README "Layout"): each module imports only from its own component or
from the layers below it, there are no import cycles, the kernels need only torch and triton, and
`import hf_hybrid_attn` / `hf-hybrid info` load neither torch nor transformers while the
registration still happens before transformers can be used.

The import graph is read from the source (every `import` statement, module-level or inside a
function), so a lazy import counts like any other."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: component -> (layer, module-name prefixes, relative to hf_hybrid_attn). A module may import its own
#: component and any component of a LOWER layer; components of the same layer are independent.
COMPONENTS = {
    "kernels": (0, ("kernels",)),
    "core": (1, ("_version", "families", "compat", "feature_maps", "config", "layers", "cache", "attention",
                 "modeling", "registration")),
    "data": (2, ("assets", "documents", "loading")),
    "training": (3, ("training",)),
    "evaluation": (3, ("evaluation", "tasks")),
    "diagnostics": (4, ("diagnostics",)),
    "hub": (4, ("hub",)),
    "testing": (4, ("testing",)),
    "serving": (4, ("serving",)),
    "cli": (5, ("cli", "demo", "")),  # "" = the package facade, hf_hybrid_attn/__init__.py
}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for base, pkg in ((ROOT / "hf_hybrid_attn", "hf_hybrid_attn"), (ROOT / "kernels", "hf_hybrid_attn.kernels")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("").parts
            if base.name == "hf_hybrid_attn" and rel[0] == "kernels":
                continue
            is_pkg = rel[-1] == "__init__"
            out[".".join((pkg, *(rel[:-1] if is_pkg else rel)))] = (path, is_pkg)
    return out


MODULES = _modules()


def _imports(name: str, path: Path, is_pkg: bool) -> tuple[set[str], set[str]]:
    """(modules of this package that `name` imports, top-level names of other packages it imports)."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                (internal if a.name.startswith("hf_hybrid_attn") else external).add(
                    a.name if a.name.startswith("hf_hybrid_attn") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                mod = node.module or ""
                if not mod.startswith("hf_hybrid_attn"):
                    external.add(mod.split(".")[0])
                    continue
            else:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                mod = f"{pkg}.{node.module}" if node.module else pkg
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            if node.module or len(subs) < len(node.names):
                internal.add(mod)
            internal.update(subs)
    internal.discard(name)
    return {m for m in internal if m in MODULES}, external


GRAPH = {name: _imports(name, *info) for name, info in MODULES.items()}


def _component(module: str) -> str:
    rel = module.removeprefix("hf_hybrid_attn").removeprefix(".")
    best = None
    for comp, (_, prefixes) in COMPONENTS.items():
        for p in prefixes:
            matches = rel == p or (p != "" and rel.startswith(p + "."))
            if matches and (best is None or len(p) > len(best[1])):
                best = (comp, p)
    assert best is not None, f"{module} belongs to no component in COMPONENTS: add it"
    return best[0]


def test_every_module_is_in_a_component_and_the_table_is_not_stale():
    used = {_component(m) for m in MODULES}
    assert used == set(COMPONENTS)


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = "open"
        stack.append(n)
        for d in sorted(GRAPH[n][0]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = "done"

    for n in sorted(GRAPH):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_each_module_imports_only_its_component_or_lower_layers():
    bad = []
    for mod, (internal, _) in GRAPH.items():
        comp = _component(mod)
        layer = COMPONENTS[comp][0]
        for dep in internal:
            dc = _component(dep)
            if dc != comp and COMPONENTS[dc][0] >= layer:
                bad.append(f"{mod} ({comp}, layer {layer}) imports {dep} ({dc}, layer {COMPONENTS[dc][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_kernels_need_only_torch_and_triton():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for mod, (internal, external) in GRAPH.items():
        if _component(mod) != "kernels":
            continue
        assert external - stdlib <= {"torch", "triton"}, (mod, external - stdlib)
        assert all(_component(d) == "kernels" for d in internal), (mod, internal)


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_import_is_light_and_registers_when_transformers_loads():
    r = _run("""
import json, sys
import hf_hybrid_attn
light = {m: m in sys.modules for m in ("torch", "transformers")}
before = hf_hybrid_attn.registration.is_registered()
from transformers import AttentionInterface, AutoConfig
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
print(json.dumps({"light": light, "before": before, "attn": "hybrid_linear_swa" in AttentionInterface._global_mapping,
                  "mask": "hybrid_linear_swa" in AttentionMaskInterface._global_mapping,
                  "config": "hybrid_llama" in CONFIG_MAPPING, "version": hf_hybrid_attn.__version__}))
""")
    assert r["light"] == {"torch": False, "transformers": False} and r["before"] is False
    assert r["attn"] and r["mask"] and r["config"] and r["version"]


@pytest.mark.parametrize("first", [
    "import transformers; import hf_hybrid_attn",              # transformers first: registered at once
    "from hf_hybrid_attn.modeling import convert",             # our module imports transformers mid-import
    "from hf_hybrid_attn.cache import HybridCache",
    "import hf_hybrid_attn; hf_hybrid_attn.convert",           # a lazy attribute
])
def test_registration_happens_whatever_is_imported_first(first):
    r = _run(f"""
import json
{first}
import hf_hybrid_attn
from transformers import AttentionInterface
print(json.dumps({{"done": hf_hybrid_attn.registration.is_registered(),
                  "attn": "hybrid_linear_swa" in AttentionInterface._global_mapping}}))
""")
    assert r == {"done": True, "attn": True}


def test_info_reads_a_config_without_torch_or_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hybrid_llama", "hybrid": {"window": 48}}))
    r = _run(f"""
import contextlib, io, json, sys
from hf_hybrid_attn.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(["info", {str(tmp_path)!r}])
print(json.dumps({{"rc": rc, "out": json.loads(buf.getvalue()), "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}}))
""")
    assert r == {"rc": 0, "out": {"model_type": "hybrid_llama", "hybrid": {"window": 48}}, "torch": False,
                 "transformers": False}


def test_cli_help_lists_every_subcommand_without_importing_them():
    r = _run("""
import contextlib, io, json, sys
from hf_hybrid_attn.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
    main(["--help"])
print(json.dumps({"help": buf.getvalue(), "torch": "torch" in sys.modules}))
""")
    for name in ("demo", "generate", "info", "convert", "diagnose", "push"):
        assert name in r["help"]
    assert r["torch"] is False


def test_wheel_maps_kernels_under_the_package_and_ships_its_data(tmp_path):
    """The built wheel installs the repository's `kernels/` folder as `hf_hybrid_attn.kernels` and
    nothing as a top-level `kernels` (PyPI's `kernels`, which transformers imports, has that name),
    and it carries the data files the package reads by path (lm-eval task files, the card template)."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PIP_CONSTRAINT": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_hybrid_attn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"hf_hybrid_attn"}, tops
    ours = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("hf_hybrid_attn/kernels/")} == ours
    for f in ("hf_hybrid_attn/tasks/hha_piqa.yaml", "hf_hybrid_attn/tasks/hha_utils.py",
              "hf_hybrid_attn/templates/hybrid_model_card.md.j2"):
        assert f in names, f
    assert "BuildBackendWarning" not in out.stderr, out.stderr[-3000:]
