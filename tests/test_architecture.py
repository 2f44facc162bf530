"""Architecture rules for src/apfsim, read from the source with ast (nothing is imported)."""

from __future__ import annotations

import ast
import itertools
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

# Bottom (0) to top (9). "x.*" is package x and everything under it; a plain name is that one
# module. The most specific entry wins: an exact name beats any "x.*", a longer "x.*" a shorter one.
LAYERS: list[tuple[int, str]] = [
    # 0: foundations: event engine, guest ABI (uapi kvm_para.h), scenario and sweep data
    (0, "apfsim.engine"),
    (0, "apfsim.abi.*"),
    (0, "apfsim.scenario"),
    (0, "apfsim.scenarios.*"),
    (0, "apfsim.sweeps.*"),
    (0, "apfsim.version"),
    (0, "apfsim.snapshot"),
    (0, "apfsim.metrics.frames"),  # pandas, imported lazily (the analysis extra)
    (0, "apfsim.pool"),  # process pools whose workers die with their coordinator
    (0, "apfsim.host"),  # the package's __init__: a docstring
    (0, "apfsim.host.costs"),  # the per-arch cost presets: plain data the scenario names
    (0, "apfsim.guest"),
    # 1: the generic async PF core (virt/kvm/async_pf.c) and the plain accumulators
    (1, "apfsim.host.async_pf"),
    (1, "apfsim.metrics.accumulators"),
    (1, "apfsim.metrics.results"),
    (1, "apfsim.metrics.units"),
    (1, "apfsim.metrics.notes"),
    (1, "apfsim.metrics.summary"),
    (1, "apfsim.stats"),  # estimates and paired ratios: plain statistics
    (1, "apfsim.metrics"),
    # 2: ports: Protocols and plain data only, the seams between the components
    (2, "apfsim.ports"),
    # 3: host memory and swap, guest scheduler and contexts, workloads
    (3, "apfsim.host.memory"),
    (3, "apfsim.host.backing"),
    (3, "apfsim.host.postcopy"),  # postcopy: the source, the link, the uffd
    (3, "apfsim.host.precopy"),  # precopy rounds before the switch-over
    (3, "apfsim.host.sched"),  # the host CPUs: CFS over the VM's threads
    (3, "apfsim.guest.sched"),
    (3, "apfsim.guest.context"),
    (3, "apfsim.guest.page_reporting"),
    (3, "apfsim.workloads.*"),
    # 4: protocol variants and their shared parts, guest APF drivers
    (4, "apfsim.protocols.*"),
    (4, "apfsim.guest.kvm_*"),
    # 5: the registry of variants, which imports every one
    (5, "apfsim.registry"),
    # 6: the run loop: guest CPU, vCPU thread
    (6, "apfsim.guest.cpu"),
    (6, "apfsim.host.vcpu"),
    (6, "apfsim.runloop.*"),
    # 7: invariants over the run loop's state
    (7, "apfsim.invariants"),
    # 8: composition: the simulation and its parts (host I/O, guest kernel, run checks,
    #    results), the model checker, the tracer
    (8, "apfsim.simulation"),
    (8, "apfsim.checking"),
    (8, "apfsim.host.io"),
    (8, "apfsim.guest.kernel"),
    (8, "apfsim.metrics.collect"),
    (8, "apfsim.check.*"),
    (8, "apfsim.trace.*"),
    # 9: library front ends: API, comparison, sweeps, reports
    (9, "apfsim.api"),
    (9, "apfsim.runner"),  # serial, process and dask executors of every command
    (9, "apfsim.compare"),
    (9, "apfsim.analysis"),
    (9, "apfsim.sweep.*"),
    (9, "apfsim.report.*"),
    # 10: entry points: the CLI, python -m apfsim, the top package
    (10, "apfsim.cli.*"),
    (10, "apfsim.__main__"),
    (10, "apfsim"),
]

SRC = Path(__file__).resolve().parents[1] / "src"


class Edge(NamedTuple):
    src: str
    dst: str
    where: str  # file:line of the import statement


def module_files(src: Path = SRC, top: str = "apfsim") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under src/top."""
    out: dict[str, Path] = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_edges(modules: dict[str, Path], root: Path = SRC.parent) -> list[Edge]:
    """Every import (any nesting, TYPE_CHECKING included) from one known module to another."""
    edges: list[Edge] = []
    for src, path in modules.items():
        package = src if path.name == "__init__.py" else src.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    # A submodule import runs its package's __init__ too (unless that is src).
                    targets += [sub] if sub in modules and base == src else [sub, base]
            where = f"{path.relative_to(root)}:{node.lineno}"
            edges += [Edge(src, dst, where) for dst in dict.fromkeys(targets) if dst in modules]
    return edges


def graph_of(edges: Iterable[Edge]) -> dict[str, dict[str, str]]:
    """src -> dst -> file:line of the first import making that edge."""
    graph: dict[str, dict[str, str]] = {}
    for edge in edges:
        graph.setdefault(edge.src, {}).setdefault(edge.dst, edge.where)
        graph.setdefault(edge.dst, {})
    return graph


def bfs_parents(graph: dict[str, dict[str, str]], start: str) -> dict[str, str]:
    """Breadth-first search tree: each module reachable from start -> its predecessor."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, {})):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return parent


def path_to(parent: dict[str, str], start: str, end: str) -> list[str]:
    """The path start -> ... -> end in a bfs_parents tree (end must be in it)."""
    path = [end]
    while len(path) == 1 or path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The shortest cycle through each edge on one (self-imports included), deduplicated."""
    cycles: dict[tuple[str, ...], list[str]] = {}
    for a in sorted(graph):
        for b in sorted(graph[a]):
            parent = {b: a} if a == b else bfs_parents(graph, b)
            if a in parent:
                ring = [a] if a == b else [a, *path_to(parent, b, a)[:-1]]
                i = ring.index(min(ring))
                ring = ring[i:] + ring[:i]
                cycles.setdefault(tuple(ring), [*ring, ring[0]])
    return sorted(cycles.values())


def layer_of(module: str, layers: list[tuple[int, str]] = LAYERS) -> int | None:
    """The layer of the most specific LAYERS entry matching module, or None."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for layer, pattern in layers:
        prefix = pattern.removesuffix(".*")
        if pattern == module:
            rank = 1_000
        elif prefix != pattern and (module == prefix or module.startswith(prefix + ".")):
            rank = prefix.count(".")
        elif pattern.endswith("*") and not pattern.endswith(".*"):
            # "apfsim.guest.kvm_*": every module of that package whose name starts so.
            head = pattern[:-1]
            if not module.startswith(head) or "." in module[len(head) :]:
                continue
            rank = head.count(".")
        else:
            continue
        if best is None or rank > best[0]:
            best = (rank, layer)
    return None if best is None else best[1]


def upward_edges(edges: Iterable[Edge], layers: list[tuple[int, str]] = LAYERS) -> list[str]:
    """Every edge to a higher layer (or touching an unplaced module), as a readable line."""
    bad = []
    for e in edges:
        a, b = layer_of(e.src, layers), layer_of(e.dst, layers)
        if a is None or b is None or b > a:
            bad.append(f"{e.where}: {e.src} (layer {a}) imports {e.dst} (layer {b})")
    return bad


EDGES = import_edges(module_files())
GRAPH = graph_of(EDGES)


def test_no_import_cycle() -> None:
    lines = []
    for cycle in find_cycles(GRAPH):
        lines.append(" -> ".join(cycle))
        lines += [f"    {a} -> {b}  ({GRAPH[a][b]})" for a, b in itertools.pairwise(cycle)]
    assert not lines, "import cycles:\n" + "\n".join(lines)


def test_no_upward_import() -> None:
    unplaced = sorted(m for m in module_files() if layer_of(m) is None)
    bad = upward_edges(EDGES)
    assert not unplaced and not bad, (
        f"modules in no layer (add them to LAYERS): {unplaced}\nupward imports:\n" + "\n".join(bad)
    )


def test_simulation_does_not_import_the_checker_or_tracer() -> None:
    parent = bfs_parents(GRAPH, "apfsim.simulation")
    bad = [
        " -> ".join(path_to(parent, "apfsim.simulation", m))
        for m in sorted(parent)
        if m.split(".")[:2] in (["apfsim", "check"], ["apfsim", "trace"])
    ]
    assert not bad, "apfsim.simulation reaches:\n" + "\n".join(bad)


def private_imports(modules: dict[str, Path], root: Path = SRC.parent) -> list[str]:
    """Every ``from M import _name`` where M lies outside the importing module's package: a
    private name crossing a package boundary (a public one belongs in M's API)."""
    bad = []
    for src, path in modules.items():
        package = src if path.name == "__init__.py" else src.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module is None:
                continue
            owner = node.module if node.module in modules else None
            if owner is None or not owner.startswith("apfsim"):
                continue
            owner_package = (
                owner if modules[owner].name == "__init__.py" else owner.rpartition(".")[0]
            )
            if owner_package == package:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    bad.append(f"{where}: {src} imports {owner}.{alias.name}")
    return bad


def test_no_private_name_crosses_a_package() -> None:
    bad = private_imports(module_files())
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


def test_private_imports_are_found(tmp_path: Path) -> None:
    pkg = tmp_path / "apfsim"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("_hidden = 1\nshown = 2\n")
    (pkg / "sibling.py").write_text("from apfsim.core import _hidden\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "user.py").write_text("from apfsim.core import _hidden, shown\n")
    found = private_imports(module_files(tmp_path), tmp_path)
    assert found == ["apfsim/sub/user.py:1: apfsim.sub.user imports apfsim.core._hidden"]


def test_graph_helpers_on_a_synthetic_graph() -> None:
    layers = [(0, "p.low"), (1, "p.mid.*"), (2, "p.mid"), (3, "p")]
    edges = [
        Edge("p.mid.a", "p.mid.b", "a:1"),
        Edge("p.mid.b", "p.mid.a", "b:1"),
        Edge("p.mid", "p.mid.a", "m:1"),
        Edge("p.low", "p.mid", "l:1"),
        Edge("p", "p", "i:1"),
    ]
    assert find_cycles(graph_of(edges)) == [["p", "p"], ["p.mid.a", "p.mid.b", "p.mid.a"]]
    names = ("p", "p.mid", "p.mid.a", "p.low", "p.x")
    assert [layer_of(m, layers) for m in names] == [3, 2, 1, 0, None]
    assert upward_edges(edges, layers) == ["l:1: p.low (layer 0) imports p.mid (layer 2)"]
    assert layer_of("apfsim.registry") == 5 and layer_of("apfsim.protocols.x86") == 4
    assert layer_of("apfsim.host.io") == 8 and layer_of("apfsim.host") == 0
    assert layer_of("apfsim.guest.kvm_apf_x86") == 4 and layer_of("apfsim.guest.cpu") == 6
