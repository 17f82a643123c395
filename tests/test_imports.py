"""The package's import graph: no circle anywhere in chatft (imports inside functions count too: a lazy import
hides a circle, it does not remove it), and no module imports a training stage but the stage dispatcher."""

from __future__ import annotations

import ast
from pathlib import Path

from chatft.args import STAGES
from chatft.training.stages import STAGE_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "chatft"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The chatft modules a file imports, anywhere in it; `from pkg import name` counts as pkg.name when that is
    a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "chatft.training.sft" in graph and "chatft.data.templates" in graph["chatft.data.dataset"]
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_only_the_dispatcher_imports_a_stage():
    stages = set(STAGE_MODULES.values())
    importers = {
        name: sorted(imported & stages)
        for name, imported in import_graph().items()
        if imported & stages and name != "chatft.training.stages"
    }
    assert importers == {}


def test_every_stage_has_a_module():
    assert set(STAGE_MODULES) == set(STAGES)


def test_bitsandbytes_is_left_out_only_where_nothing_may_use_it(tmp_path):
    """finetune.py leaves bitsandbytes out of a run's start (a second of torch's compiler) unless the command
    line, its --config or its model's config.json names quantization or a bitsandbytes optimizer."""
    from chatft.lean_imports import needs_bitsandbytes

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    plain = ["--model_name_or_path", str(model), "--method", "lora", "--train_file", "x.jsonl"]
    assert not needs_bitsandbytes(plain)
    assert needs_bitsandbytes([*plain, "--method", "qlora"])
    assert needs_bitsandbytes([*plain, "--quantization_bit=8"])
    assert needs_bitsandbytes([*plain, "--optim", "paged_adamw_32bit"])
    assert needs_bitsandbytes([*plain, "--optim", "adamw_bnb_8bit"])
    config = tmp_path / "run.yaml"
    config.write_text("method: lora\n")
    assert not needs_bitsandbytes([*plain, "--config", str(config)])
    config.write_text("method: qlora\n")
    assert needs_bitsandbytes([*plain, f"--config={config}"])
    assert needs_bitsandbytes([*plain, "--config", str(tmp_path / "missing.yaml")])  # unread: it may
    (model / "config.json").write_text('{"quantization_config": {"quant_method": "bitsandbytes"}}')
    assert needs_bitsandbytes(plain)


def test_a_run_without_bitsandbytes_starts_and_sees_it_as_not_installed():
    """With bitsandbytes left out, the training stack imports and peft and transformers call it not installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from chatft.lean_imports import leave_out_bitsandbytes\n"
        "assert leave_out_bitsandbytes(['--method', 'lora'])\n"
        "import chatft.training.sft\n"
        "from transformers.utils import is_bitsandbytes_available\n"
        "from peft.import_utils import is_bnb_available\n"
        "print(is_bitsandbytes_available(), is_bnb_available(), sys.modules['bitsandbytes'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "None"]
