"""The layering DESIGN.md asks for: no import cycles among wan_spmd's modules, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "wan_spmd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], me: str | None = None) -> set[str]:
    """wan_spmd modules `path` imports, at module or function level, `if TYPE_CHECKING:` blocks
    included: a cycle hidden there is still a cycle of the design."""
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in modules and name != me}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycles():
    """If this fails, two modules import each other (perhaps through a function-level import), and
    the layers of DESIGN.md (cli -> fronts -> runtime -> pipeline -> models, parallel) have a loop."""
    graph = import_graph()
    assert len(graph) > 20 and graph["wan_spmd.engine"], "the import graph was not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_sees_function_level_and_type_checking_imports(tmp_path):
    """The checker itself: imports inside functions and `if TYPE_CHECKING:` blocks count (issue 26:
    loading <-> lora was hidden that way)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import wan_spmd.x\n"
        "def f():\n    from wan_spmd import y\n"
    )
    assert imports_of(src, {"wan_spmd.x", "wan_spmd.y", "wan_spmd"}, "wan_spmd.m") == {
        "wan_spmd",
        "wan_spmd.x",
        "wan_spmd.y",
    }


def test_only_parallel_and_runtime_call_torch_distributed():
    """DESIGN.md: torch.distributed appears in the runtime and the parallel package, nowhere else
    (the loaders only name a DeviceMesh type)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith("wan_spmd.parallel") or name == "wan_spmd.runtime":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in mods):
                    if name == "wan_spmd.loading" and isinstance(node, ast.ImportFrom):
                        if node.module == "torch.distributed.device_mesh":
                            continue
                    offenders.append(f"{name}: {ast.unparse(node)}")
    assert offenders == []


def test_fronts_write_no_video():
    """Issue 11: one delivery path. If this fails, a front (generate, batch, serve glue, HTTP app)
    encodes video itself again, beside the engine's verified, streamed writer."""
    writers = {"write_mp4", "Mp4Writer", "imageio_ffmpeg", "deliver"}
    fronts = [PACKAGE / "generate.py", PACKAGE / "serve.py", *(PACKAGE / "batch").glob("*.py")]
    fronts += [*(PACKAGE / "server").rglob("*.py")]
    found = []
    for path in fronts:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[-1] in writers]
    assert found == []


def test_the_option_table_imports_only_the_standard_library():
    """options.py is read by the CLI before anything else and by the HTTP layer: if this fails, a
    bad flag value pays for the import of whatever it now pulls in (or a cycle waits for it)."""
    import sys

    tree = ast.parse((PACKAGE / "options.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {name.split(".")[0] for name in names} <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_runtime_and_parallel_do_not_import_the_pipeline():
    """DESIGN.md's arrows: the pipeline calls the runtime's and the parallel package's objects, never
    the other way (the runtime once imported it for JobCancelled, and parallel/vae.py called back
    into it). If this fails, one of them imports `wan_spmd.pipeline` again."""
    graph = import_graph()
    offenders = [m for m, deps in graph.items() if "wan_spmd.pipeline" in deps]
    offenders = [m for m in offenders if m == "wan_spmd.runtime" or m.startswith("wan_spmd.parallel")]
    assert offenders == []


def test_private_diffusers_names_only_in_compat():
    """Issue 26: every private diffusers name (`diffusers...._x`, or an underscore attribute of a
    diffusers object such as the VAE's `_feat_map`) is used in `wan_spmd/compat.py` alone, which says
    the tested version range. If this fails, a module leans on a diffusers internal directly."""
    private_attrs = {"_feat_map", "_conv_idx", "_padding", "_attention_backend", "_parallel_config", "_decode"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                names = [node.module, *(a.name for a in node.names)]
                if any(part.startswith("_") for n in names for part in n.split(".")):
                    offenders.append(f"{path.name}: {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and node.attr in private_attrs:
                offenders.append(f"{path.name}: {ast.unparse(node)}")
    assert offenders == []
