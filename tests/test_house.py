"""The house rules of the package, read from the source with `ast` (nothing is imported):

- `multimood/model/` is the Hub remote code: its files are copied flat into every saved model folder and loaded
  there by transformers as a package of siblings, so a model file imports only its siblings, in the form
  `from .records import ...` (the one transformers follows when it copies a class's file and the files that
  file imports), never `multimood` nor a relative path that leaves `model/`;
- the package has no import cycle between its modules: data flows one way (record -> processor -> collator ->
  model -> parser -> metrics), and tooling sits on top of the model, never under it.

Every import statement counts, function-local and `TYPE_CHECKING` ones included: a local import is still a
dependency of the module (it only runs later). What does not count is the implicit import of a module's parent
package (`multimood/__init__.py` runs before any `multimood.x`): every module would then close a cycle with it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "multimood"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` (a package is named by its __init__)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path) -> Iterator[tuple[ast.stmt, list[str]]]:
    """Each import statement of module `name` and the dotted names it asks for, relative ones made absolute
    (`from a import b` asks for `a.b`: the module `a.b`, or the attribute `b` of the module `a`)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = ".".join(anchor[: len(anchor) - drop] if drop else anchor)
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node, [f"{module}.{alias.name}" for alias in node.names]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (each asked-for name resolved to its longest module prefix)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, asked in imports_of(name, path):
            for dotted in asked:
                parts = dotted.split(".")
                target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                               if ".".join(parts[:n]) in modules), None)
                if target is not None and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search over the modules in name order)."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor in on_stack:
                return stack[stack.index(successor):] + [successor]
            if successor not in done:
                cycle = visit(successor)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def model_imports_leaving_model(package: Path) -> list[str]:
    """`file:line: statement` for each import in model/ that is not a sibling-relative import of a model file."""
    model = package / "model"
    siblings = {path.stem for path in model.glob("*.py")}
    problems = []
    for path in sorted(model.glob("*.py")):
        name = f"{package.name}.model.{path.stem}" if path.stem != "__init__" else f"{package.name}.model"
        for node, asked in imports_of(name, path):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1:
                    reason = "leaves model/ (saved folders hold model/ alone, flat)"
                elif node.module and node.module.split(".")[0] not in siblings:
                    reason = f"no sibling {node.module}.py in model/"
                elif not node.module:
                    reason = ("is not of the form `from .sibling import name`, the only one transformers follows "
                              "when it copies remote code into a saved folder")
                else:
                    continue
            elif any(dotted.split(".")[0] == package.name for dotted in asked):
                reason = f"imports the {package.name} package (absent where the remote code runs)"
            else:
                continue
            problems.append(f"{path.relative_to(package.parent)}:{node.lineno}: `{ast.unparse(node)}` {reason}")
    return problems


def test_model_imports_only_its_siblings():
    problems = model_imports_leaving_model(PACKAGE)
    assert not problems, (
        "multimood/model/ is Hub remote code, copied flat into saved folders: its files may import only each "
        "other (`from .records import ...`), transformers and third-party libraries. Move the shared code into "
        "model/ or the import out of it:\n" + "\n".join(problems)
    )


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, (
        f"import cycle: {' -> '.join(cycle)}. Move what both sides need into the lower of the two layers "
        "(from the bottom: model/, cli.py's error contract, data/, checkpoints/, training/, evaluation/, apps/)"
    )


def test_the_checks_find_planted_faults(tmp_path: Path):
    """The two checks on a small package with one fault of each kind (and imports that are allowed)."""
    package = tmp_path / "pkg"
    files = {
        "__init__.py": "from .model.records import Record\n",
        "cli.py": "from .model.records import Record\n",
        "model/__init__.py": "",
        "model/records.py": "import json\n",
        "model/processing.py": (
            "from typing import TYPE_CHECKING\n"
            "import torch\n"
            "from .records import Record\n"
            "from . import records\n"
            "def load():\n"
            "    from ..cli import run_command\n"
            "if TYPE_CHECKING:\n"
            "    import pkg.train\n"
        ),
        "train.py": "from .convert import read\nfrom .model import processing\n",
        "convert.py": "def f():\n    from . import train\n",
        "apps/__init__.py": "",
        "apps/demo.py": "from ..train import fit\nfrom pkg.model.records import Record\n",
    }
    for relative, text in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)

    problems = model_imports_leaving_model(package)
    assert [problem.split(": `")[0] for problem in problems] == [
        "pkg/model/processing.py:4", "pkg/model/processing.py:6", "pkg/model/processing.py:8"
    ]
    graph = import_graph(package)
    assert graph["pkg.model.processing"] == {"pkg.model.records", "pkg.cli", "pkg.train"}
    assert graph["pkg.apps.demo"] == {"pkg.train", "pkg.model.records"}
    assert find_cycle(graph) == ["pkg.train", "pkg.convert", "pkg.train"]  # through a function-local import

    (package / "convert.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(package)) == ["pkg.train", "pkg.model.processing", "pkg.train"]
    (package / "model/processing.py").write_text("import torch\nfrom .records import Record\n")
    assert model_imports_leaving_model(package) == []
    assert find_cycle(import_graph(package)) is None
