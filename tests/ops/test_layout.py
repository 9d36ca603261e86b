"""Import layering: the Triton kernels (hcrlhf/kernels/) never import
hcrlhf.ops, hcrlhf.ops imports the kernels only lazily (inside the function that launches them),
and the output-allocation helpers both share live in the leaf module hcrlhf._op_outputs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = sorted((ROOT / "hcrlhf" / "kernels").rglob("*.py"))
OPS_FILES = sorted((ROOT / "hcrlhf" / "ops").rglob("*.py"))
LEAF = ROOT / "hcrlhf" / "_op_outputs.py"


def imported_modules(node: ast.AST):
    """(module, lineno) for every import under `node`; ``from a import b`` yields both a and a.b."""
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield alias.name, child.lineno
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            yield child.module, child.lineno
            for alias in child.names:
                yield f"{child.module}.{alias.name}", child.lineno


def module_level_imports(tree: ast.Module):
    """Imports that run when the module is imported: everything outside function bodies."""
    pending = list(tree.body)
    while pending:
        stmt = pending.pop()
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield from imported_modules(stmt)
        else:
            pending.extend(ast.iter_child_nodes(stmt))


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_scan_sees_the_files():
    assert {p.name for p in KERNEL_FILES} >= {"gae.py", "safe_advantages.py", "rloo_advantages.py"}
    assert {p.name for p in OPS_FILES} >= {"gae.py", "safe_advantages.py", "rloo_advantages.py"}


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_kernels_do_not_import_ops(path):
    bad = [f"line {line}: {module}" for module, line in imported_modules(parse(path))
           if is_within(module, "hcrlhf.ops")]
    assert not bad, (f"{path.relative_to(ROOT)} imports hcrlhf.ops ({', '.join(bad)}); hcrlhf/kernels/ must not "
                     "depend on the ops (import cycle). Shared helpers belong in a leaf module such as "
                     "hcrlhf._op_outputs.")


@pytest.mark.parametrize("path", OPS_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_ops_import_kernels_only_lazily(path):
    bad = [f"line {line}: {module}" for module, line in module_level_imports(parse(path))
           if is_within(module, "hcrlhf.kernels") or is_within(module, "triton")]
    assert not bad, (f"{path.relative_to(ROOT)} imports Triton kernels at module level ({', '.join(bad)}); "
                     "import them inside the function that launches them, so `import hcrlhf.ops` needs no Triton.")


def test_output_helpers_are_a_leaf():
    bad = [f"line {line}: {module}" for module, line in imported_modules(parse(LEAF))
           if module.startswith("hcrlhf") or is_within(module, "triton")]
    assert not bad, f"hcrlhf/_op_outputs.py must import neither hcrlhf nor triton: {', '.join(bad)}"


def test_importing_ops_loads_neither_kernels_nor_triton():
    code = ("import sys, hcrlhf.ops; "
            "print(sorted(m for m in sys.modules if m.startswith(('hcrlhf.kernels', 'triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"`import hcrlhf.ops` loaded {out.stdout.strip()[:300]}"


def test_no_top_level_folder_shadows_an_installed_package():
    """Python started in the repository root (``python -m pytest``, ``python -m hcrlhf``) imports a
    top-level folder before site-packages: a folder named like an installed package (a ``kernels/`` here
    once hid the ``kernels`` package that transformers 5.x imports) breaks every import of it."""
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    # verl 0.9.1 and OpenRLHF 0.11.2 (requirements/peers.txt) install their own test suites as a top-level
    # `tests` package by mistake; no library code imports it (only their test files do), so our `tests/`
    # hiding it breaks nothing. Any other collision still fails.
    stray_test_suites = {"tests"}
    shadowing = sorted((name, installed[name]) for name in folders & set(installed)
                       if name != "hcrlhf" and name not in stray_test_suites)
    assert not shadowing, f"top-level folders shadow installed packages (import name, distributions): {shadowing}"
