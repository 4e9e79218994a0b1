"""The package's layering: every module imports only its own stage or stages below, and the import
graph (top-level and function-level imports alike) has no cycle."""

import ast
import re
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "rulegraph"
#: stage by first name under rulegraph; a module not listed is above every stage (viz, cli, testing)
STAGES = {"errors": 0, "graph": 1, "lang": 2, "backward": 3, "compile": 4, "run": 5, "check": 6}
TOP = len(STAGES)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The rulegraph modules ``path`` imports, anywhere in it, as dotted names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rulegraph")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            if source.startswith("rulegraph"):
                found |= {f"{source}.{a.name}" if not node.module or is_module(f"{source}.{a.name}")
                          else source for a in node.names}
    return found - {"rulegraph"}


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.get(parts[1], TOP) if len(parts) > 1 else TOP


GRAPH = nx.DiGraph([(module_name(p), m) for p in PACKAGE.rglob("*.py") for m in imports(p)])


def test_no_module_imports_a_higher_stage():
    assert [(a, b) for a, b in GRAPH.edges if stage(b) > stage(a)] == []


def test_the_import_graph_has_no_cycle():
    assert list(nx.simple_cycles(GRAPH)) == []


def test_the_rule_language_knows_nothing_of_onnx():
    """lang/ reads text against a catalog it is given: it imports no ONNX and no model reading."""
    lang = [p for p in (PACKAGE / "lang").glob("*.py")]
    onnx = [p.name for p in lang if re.search(r"^\s*(import|from) onnx", p.read_text(encoding="utf-8"), re.M)]
    reads = [(a, b) for a, b in GRAPH.edges if a.startswith("rulegraph.lang") and stage(b) != STAGES["errors"]
             and not b.startswith("rulegraph.lang")]
    assert lang and onnx == [] and reads == []


def test_the_readme_layout_names_modules_that_exist():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):].split("\n## ")[0]
    named = set(re.findall(r"`(\w+\.(?:py|lark))`", layout))
    assert named and sorted(n for n in named if not any(PACKAGE.rglob(n))) == []
