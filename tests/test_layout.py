"""The package layout shows the flow: the quantization pipeline at ``qvlm_offline``'s top level,
the tools around it in ``qvlm_offline.tools``, the test-model builders in
``qvlm_offline.testmodels``. The pipeline never imports a tool or a test-model builder (only
the CLI wires them together), and every vLLM child process goes through one runner."""

import ast
from pathlib import Path

OFFLINE = Path(__file__).resolve().parent.parent / "offline"
WIRING = {"cli.py"}  # the command line registers every tool's sub-command


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports, absolute (``qvlm_offline.x.y``), relative ones resolved."""
    pkg = ["qvlm_offline", *path.relative_to(OFFLINE).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_pipeline_modules_import_no_tool_or_test_model():
    for path in sorted(OFFLINE.glob("*.py")):
        if path.name in WIRING:
            continue
        bad = {m for m in _imports(path) if m.startswith(("qvlm_offline.tools", "qvlm_offline.testmodels"))}
        assert not bad, f"{path.name} (pipeline) imports {sorted(bad)}"


def test_test_model_builders_import_no_tool():
    for path in sorted((OFFLINE / "testmodels").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith("qvlm_offline.tools")}
        assert not bad, f"testmodels/{path.name} imports {sorted(bad)}"


def test_one_child_process_runner():
    """``subprocess`` starts Python children in one place: tools/child.py (bench also asks
    nvidia-smi for the driver version)."""
    for path in sorted(OFFLINE.rglob("*.py")):
        text = path.read_text()
        if path.name == "child.py" or "subprocess" not in text:
            continue
        assert "sys.executable" not in text, f"{path.relative_to(OFFLINE)} starts its own Python child"
