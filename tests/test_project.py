"""The project's promises that no single module test covers: the runtime dependencies are exactly torch, numpy,
tiktoken and tqdm, and the project's own code never imports anything else from outside the standard library."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = {"torch", "numpy", "tiktoken", "tqdm"}
OPTIONAL = {"matplotlib", "transformers"}  # eval.py --plot, bench.py's comparison: only inside try/except


def project_files():
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def test_requirements_are_exactly_the_runtime_four_with_lower_bounds():
    lines = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, "requirements.txt"))]
    reqs = [l for l in lines if l]
    names = {re.split(r"[<>=!~ ]", r)[0].lower() for r in reqs}
    assert names == RUNTIME
    for r in reqs:
        assert "==" not in r and "<" not in r, f"{r}: lower bounds only"


def test_project_code_imports_only_stdlib_runtime_deps_and_itself():
    own = {f[:-3] for f in project_files()}
    allowed = RUNTIME | OPTIONAL | own | set(sys.stdlib_module_names)
    assert project_files(), "no project files found"
    for fname in project_files():
        tree = ast.parse(open(os.path.join(ROOT, fname)).read(), fname)
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                assert top in allowed, f"{fname} imports {m}, which is not a runtime dependency"
                if top in OPTIONAL:
                    assert id(node) in guarded, f"{fname} imports optional {m} outside a try block"
