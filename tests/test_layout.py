"""The layout by stage holds: each folder imports only what its docstring's "May import:" line allows, the
folders import each other without a circle, and no module imports another in a circle.

Every import counts, also one inside a function (a lazy import is still a dependency); only imports under
`if TYPE_CHECKING:` (never run) are left out.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "duoclass"
ROOT_MODULES = {"api": "anything", "errors": "", "__init__": "", "__main__": "cli"}  # modules beside the folders


def stages() -> list[str]:
    return sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def allowed(stage: str) -> set[str]:
    """The stages a folder may import, from its __init__.py docstring ("May import: duoclass.errors, artifacts, ...")."""
    doc = ast.get_docstring(ast.parse((SRC / stage / "__init__.py").read_text())) or ""
    m = re.search(r"May import: ([^\n]*(?:\n(?!\n)[^\n]*)*)", doc)
    assert m, f"{stage}/__init__.py: the docstring has no 'May import:' line"
    text = m.group(1)
    if "anything in duoclass" in text:
        return set(stages()) | set(ROOT_MODULES)
    names = {n.strip().removeprefix("duoclass.").split(" ")[0].rstrip(".") for n in text.replace("\n", " ").split(",")}
    return {n for n in names if n}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported duoclass module or name's module) for every import of duoclass code in the file."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "duoclass"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "duoclass":
                continue
            if mod == "duoclass":  # from duoclass import x: x is a module, or a name of the package (__version__)
                out += [(node.lineno, f"duoclass.{a.name}" if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file()
                         else "duoclass") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself (__version__)
    return parts[1]


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(folder -> folders it imports, module -> modules it imports, rule violations)."""
    folders: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    bad = []
    known = set(stages()) | set(ROOT_MODULES)
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        mine = stage_of(me) or "__init__"
        for line, target in imports_of(path):
            other = stage_of(target)
            if other is None or other == mine:
                if other == mine and target != me:
                    modules.setdefault(me, set()).add(target)
                continue
            assert other in known, f"{path}:{line}: imports {target}, which is no stage or root module"
            modules.setdefault(me, set()).add(target)
            folders.setdefault(mine, set()).add(other)
            if mine in ROOT_MODULES:
                rule = ROOT_MODULES[mine]
                ok = rule == "anything" or other in rule.split(",")
            else:
                ok = other in allowed(mine) or other == "errors"
            if not ok:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {mine} imports {target}")
    return folders, modules, bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return found


def test_every_folder_imports_only_what_its_docstring_allows() -> None:
    _, _, bad = graph()
    assert not bad, "\n".join(bad)


def test_folders_import_each_other_without_a_circle() -> None:
    folders, _, _ = graph()
    assert not cycles({k: v - {k} for k, v in folders.items()}), cycles(folders)


def test_modules_import_each_other_without_a_circle() -> None:
    _, modules, _ = graph()
    assert not cycles(modules), cycles(modules)


def test_no_compatibility_reexports() -> None:
    """A module does not hand on another module's names ("re-exported", "for compatibility")."""
    hits = [f"{p.relative_to(SRC.parent)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"#.*(re-export|for compatibility)", line)]
    assert not hits, hits


@pytest.mark.parametrize("broken", ["circle", "forbidden"])
def test_the_checks_can_fail(broken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself, on a made-up tree: a circle and a forbidden import are both reported."""
    pkg = tmp_path / "duoclass"
    for stage, doc in (("low", "May import: duoclass.errors."), ("high", "May import: duoclass.errors, low.")):
        (pkg / stage).mkdir(parents=True)
        (pkg / stage / "__init__.py").write_text(f'"""{stage}.\n\n{doc}\n"""\n')
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "high" / "a.py").write_text("from duoclass.low import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from duoclass.high import a\n" if broken == "circle" else "import os\n")
    if broken == "forbidden":
        (pkg / "low" / "c.py").write_text("from duoclass.high.a import x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", pkg)
    folders, _, bad = graph()
    assert bad, "a lower stage importing a higher one must be reported"
    if broken == "circle":
        assert cycles(folders)


def test_long_functions_say_why() -> None:
    """No function over 80 lines without a comment just above it that says why it is long."""
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        lines = p.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2
                block = []
                while first >= 0 and lines[first].strip().startswith("#"):
                    block.append(lines[first].lower())
                    first -= 1
                if not any("long" in line for line in block):
                    bad.append(f"{p.relative_to(SRC.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not bad, bad
