"""The import layers of docs/architecture.md section 1, checked.

Why this exists: the design keeps the engine usable without a mount (fsck, restore, the
archive-only mount, these tests) only while imports point down the layers. This test reads
every module of the package with `ast` (imports inside functions and `TYPE_CHECKING` blocks
included) and fails on any import of a higher layer, on an import cycle between modules, on
trio below the engine and on pyfuse3 outside the FUSE layer. A new module must be placed in
LAYERS (and in the architecture document) before it is allowed in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vnafs

PACKAGE = Path(vnafs.__file__).parent

# Lowest first. A module may import modules of its own layer and of any layer below it.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["vnafs", "vnafs.errors", "vnafs.heap", "vnafs.mountinfo", "vnafs.timespec",
                     "vnafs.archive.url", "vnafs.logs", "vnafs.service"]),
    ("configuration and keys", ["vnafs.config", "vnafs.keys", "vnafs.control"]),
    ("sealing", ["vnafs.seal"]),
    ("records", ["vnafs.meta.records", "vnafs.meta.tx", "vnafs.meta.db"]),
    ("metadata", ["vnafs.meta.blocks", "vnafs.meta.namespace", "vnafs.meta.snapshots"]),
    ("stores and parsers", ["vnafs.store.hot", "vnafs.store.marker", "vnafs.archive.backend",
                            "vnafs.archive.log", "vnafs.dicom.names", "vnafs.dicom.header",
                            "vnafs.dicom.sniff"]),
    ("offline engine", ["vnafs.dicom.index", "vnafs.dicom.query", "vnafs.store.lifecycle",
                        "vnafs.archive.restore", "vnafs.archive.verify",
                        "vnafs.archive.retention", "vnafs.fsck",
                        "vnafs.tier.state", "vnafs.keyadmin", "vnafs.reseal",
                        "vnafs.audit.chain"]),
    ("trio engine", ["vnafs.fs.engine"]),
    ("services", ["vnafs.fs.files", "vnafs.fs.views", "vnafs.fs.snapshot_service",
                  "vnafs.archive.recall", "vnafs.archive.replicator",
                  "vnafs.archive.follower", "vnafs.audit.recorder"]),
    ("tasks", ["vnafs.fs.indexer", "vnafs.fs.inodes", "vnafs.fs.kernel_cache",
               "vnafs.archive.maintenance", "vnafs.tier.tierer", "vnafs.tier.cache"]),
    ("FUSE", ["vnafs.fs.operations"]),
    ("daemon", ["vnafs.control_server", "vnafs.metrics", "vnafs.daemon"]),
    ("commands", ["vnafs.demo", "vnafs.cli"]),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
TRIO_FROM = RANK["vnafs.fs.engine"]
PYFUSE3_IN = {"vnafs.fs.operations", "vnafs.fs.kernel_cache", "vnafs.daemon"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute module names imported by the file (`from vnafs import x` counts as vnafs.x
    when x is a module)."""
    tree = ast.parse(path.read_text())
    known = _modules()
    found: set[str] = set()
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:
                    found.add(f"{node.module}.{alias.name}")
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(_modules()) - set(RANK) - {"vnafs.archive", "vnafs.audit", "vnafs.dicom",
                                                     "vnafs.fs", "vnafs.meta", "vnafs.tier",
                                                     "vnafs.store"})
    assert not missing, f"place these modules in LAYERS and docs/architecture.md: {missing}"
    stale = sorted(set(RANK) - set(_modules()))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, path in _modules().items():
        if module not in RANK:
            continue
        for imported in _imports(path):
            if imported in RANK and RANK[imported] > RANK[module]:
                wrong.append(f"{module} ({LAYERS[RANK[module]][0]}) imports {imported} "
                             f"({LAYERS[RANK[imported]][0]})")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules() -> None:
    graph = {module: {m for m in _imports(path, top_level_only=True) if m in RANK}
             for module, path in _modules().items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep == module or dep == "vnafs":
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_trio_and_pyfuse3_stay_in_their_layers() -> None:
    wrong = []
    for module, path in _modules().items():
        imports = _imports(path)
        if "trio" in imports and RANK.get(module, TRIO_FROM) < TRIO_FROM:
            wrong.append(f"{module} imports trio below the engine")
        if "pyfuse3" in imports and module not in PYFUSE3_IN:
            wrong.append(f"{module} imports pyfuse3 outside the FUSE layer")
    assert not wrong, "\n".join(wrong)


def test_the_architecture_document_lists_the_same_layers() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for name, modules in LAYERS:
        assert name in doc, f"layer {name!r} is not in docs/architecture.md section 1"
        for module in modules:
            if module == "vnafs":
                continue
            short = module.removeprefix("vnafs.").replace(".", "/") + ".py"
            assert short in doc, f"{short} is not in docs/architecture.md section 1"
