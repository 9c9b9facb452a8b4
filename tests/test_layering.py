"""Layering: gptcore stays importable without the platform; in flows, each third-party system
sits behind one seam, stages import only downward, and no module import cycle exists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"ray", "deepspeed", "mlflow", "datasets", "fastapi", "flows", "transformers"}
GPTCORE = Path(__file__).resolve().parents[1] / "gptcore"


def test_gptcore_source_imports_nothing_forbidden():
    offenders = []
    for path in sorted(GPTCORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_gptcore_loads_no_forbidden_module():
    code = (
        "import sys, gptcore, gptcore.hf; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_only_tracking_imports_mlflow_and_only_cluster_calls_ray_init():
    flows = GPTCORE.parent / "flows"
    for path in sorted(flows.rglob("*.py")):
        text = path.read_text()
        # tracking.py is the seam; pyfunc_model.py is the model file MLflow itself loads (as code)
        if path.relative_to(flows).as_posix() not in ("tracking.py", "registry/pyfunc_model.py"):
            assert "import mlflow" not in text and "from mlflow" not in text, path
        if path.name != "cluster.py":
            assert "ray.init(" not in text, path


def test_tokenizer_import_does_not_load_torch():
    """Preprocessing workers import only the tokenizer; torch costs seconds per process."""
    code = "import sys; from gptcore import Tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exports_stay_functions_after_importing_every_submodule():
    """A submodule named like an export (gptcore/generate.py) would replace the function on
    import."""
    code = (
        "import importlib, pkgutil, gptcore; "
        "[importlib.import_module('gptcore.' + m.name) "
        "for m in pkgutil.iter_modules(gptcore.__path__)]; "
        "from gptcore import generate, load_bundle, preset; "
        "print(all(callable(f) and not hasattr(f, '__path__') and type(f).__name__ != 'module' "
        "for f in (generate, load_bundle, preset)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_importing_the_config_loads_no_stage_system():
    """`gptflow config`, the CLI's parsing and every stage read flows.config: it must stay light."""
    code = (
        "import sys, flows.config; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] "
        "in ('ray', 'mlflow', 'deepspeed', 'torch')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _flows_imports() -> dict[str, set[str]]:
    """Module name -> the flows modules it imports (at top level or inside functions)."""
    flows = GPTCORE.parent / "flows"
    graph: dict[str, set[str]] = {}
    for path in sorted(flows.rglob("*.py")):
        rel = path.relative_to(flows.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("flows")}
            elif (
                isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flows")
            ):
                deps.add(node.module)
                deps |= {
                    f"{node.module}.{a.name}" for a in node.names
                }  # `from flows.data import stage`
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_stage_packages_import_only_downward_and_never_the_runner():
    graph = _flows_imports()
    # (package, packages it must not import): stages never reach the runner, the CLI or the report,
    # and data knows nothing of training or evaluation (the dataset contract lives in flows.data).
    rules = {
        "flows.data": (
            "flows.train",
            "flows.evaluate",
            "flows.pipeline",
            "flows.cli",
            "flows.report",
        ),
        "flows.train": ("flows.evaluate", "flows.pipeline", "flows.cli", "flows.report"),
        "flows.evaluate": (
            "flows.train",
            "flows.registry",
            "flows.pipeline",
            "flows.cli",
            "flows.report",
        ),
        "flows.registry": (
            "flows.train",
            "flows.data.stage",
            "flows.pipeline",
            "flows.cli",
            "flows.report",
        ),
        "flows.workdir": ("flows.",),
    }
    offenders = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        for pkg, banned in rules.items()
        if m == pkg or m.startswith(pkg + ".")
        for d in deps
        if d.startswith(banned) and d != m and not (pkg == "flows.workdir" and d in ("flows",))
    ]
    # The config modules (flows/config.py, the sections beside their stages, flows/configlib.py)
    # import only one another: a config is read without any stage.
    config = {m for m in graph if m in ("flows.config", "flows.configlib") or m.endswith(".config")}
    offenders += [f"{m} imports {d}" for m in sorted(config) for d in graph[m] if d not in config]
    assert not offenders, offenders
    assert {"flows.data.dataset"} <= graph["flows.train.prepare"] | graph["flows.train.windows"]
    assert "flows.data.dataset" in graph["flows.evaluate.stage"]


def test_flows_has_no_import_cycle():
    graph = _flows_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == 1 and not m.startswith(d + "."):
                raise AssertionError(" -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
