"""The layout is the architecture: imports run one way, with no circles.

Every import statement of every module counts, including the ones inside functions (they
run, only later); imports under ``if TYPE_CHECKING:`` do not (they never run). The layers,
bottom to top, are the README's "Architecture" section; a module may import its own layer
and the layers below, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "npcchat": ROOT / "npcchat",
    "npcchat_heads": ROOT / "heads" / "npcchat_heads",
    "npcchat_convert": ROOT / "convert" / "npcchat_convert",
    "npcchat_train": ROOT / "train" / "npcchat_train",
}

# (layer, module prefixes), bottom first. A prefix names a module or a whole subpackage.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "npcchat",  # the package itself: lazy exports only
            "npcchat.errors",
            "npcchat.types",
            "npcchat.files",
            "npcchat.config",
            "npcchat.extras",
            "npcchat.text",
            "npcchat.demo",
        ),
    ),
    ("sessions", ("npcchat.sessions",)),
    ("runtime", ("npcchat.runtime",)),
    ("mind and rules", ("npcchat.mind", "npcchat.rules")),
    ("conversation", ("npcchat.conversation",)),
    ("eval and bench", ("npcchat.eval", "npcchat.bench")),
    ("api", ("npcchat.api",)),
    ("serve", ("npcchat.serve",)),
    ("cluster", ("npcchat.cluster",)),
    ("heads", ("npcchat_heads",)),
    ("convert", ("npcchat_convert",)),
    ("train", ("npcchat_train",)),
    (
        "cli",
        (
            "npcchat.cli",
            "npcchat.__main__",
            "npcchat_heads.cli",
            "npcchat_convert.cli",
            "npcchat_train.cli",
        ),
    ),
]


def _modules() -> dict[str, Path]:
    out = {}
    for name, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [name, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports at run time."""
    tree = ast.parse(path.read_text("utf-8"))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known or m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) - {m} for m, p in mods.items()}


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} belongs to no layer: add it to LAYERS and the README"
    return rank


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer(module)


def test_imports_run_down_the_layers_only() -> None:
    wrong = []
    for module, targets in sorted(_graph().items()):
        for target in sorted(targets):
            if _layer(target) > _layer(module):
                wrong.append(
                    f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
                    f"({LAYERS[_layer(target)][0]})"
                )
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def test_runtime_packages_never_import_the_model_side() -> None:
    """npcchat (but its CLI) imports nothing of npcchat_convert, npcchat_heads or
    npcchat_train: a game's runtime install never needs them (their commands come in
    through entry points); nothing below training imports it."""
    side = ("npcchat_convert", "npcchat_heads", "npcchat_train")
    for module, targets in _graph().items():
        if module.startswith("npcchat.") and not module.startswith("npcchat.cli"):
            assert not {t for t in targets if t.startswith(side)}
        if module.startswith(("npcchat_convert", "npcchat_heads")):
            assert not {t for t in targets if t.startswith("npcchat_train")}
    cli = {t for m, ts in _graph().items() if m.startswith("npcchat.cli") for t in ts}
    assert not {t for t in cli if t.startswith(side)}


def _third_party_importers(name: str) -> set[str]:
    out = set()
    for module, path in _modules().items():
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == name or n.startswith(name + ".") for n in names):
                out.add(module)
    return out


def test_native_and_terminal_libraries_have_one_importer_each() -> None:
    assert _third_party_importers("llama_cpp") == {"npcchat.runtime.backend"}
    assert _third_party_importers("onnxruntime") == {"npcchat.runtime.heads"}
    assert _third_party_importers("rich") == {"npcchat.cli.ui"}
    assert _third_party_importers("prompt_toolkit") == {"npcchat.cli.lineedit"}
    assert {m.rsplit(".", 1)[0] for m in _third_party_importers("ray")} == {"npcchat.cluster"}


def test_no_formatter_escapes_beyond_a_handful() -> None:
    skips = sum(
        path.read_text("utf-8").count("fmt: skip")
        for root in PACKAGES.values()
        for path in root.rglob("*.py")
    )
    assert skips <= 5


def test_every_package_is_in_the_wheel() -> None:
    """pyproject lists packages by hand (two live under renamed folders): a new subpackage
    missing there would work in the editable checkout and vanish from `pip install .`."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert listed == found
