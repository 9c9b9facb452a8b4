"""gptcore must stay importable without the platform: no Ray, DeepSpeed, MLflow, datasets, FastAPI or flows."""

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
        if path.name != "tracking.py":
            assert "import mlflow" not in text and "from mlflow" not in text, path
        if path.name != "cluster.py":
            assert "ray.init(" not in text, path


def test_tokenizer_import_does_not_load_torch():
    """Preprocessing workers import only the tokenizer; torch costs seconds per process."""
    code = "import sys; from gptcore import Tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exports_stay_functions_after_importing_every_submodule():
    """A submodule named like an export (gptcore/generate.py) would replace the function on import."""
    code = (
        "import importlib, pkgutil, gptcore; "
        "[importlib.import_module('gptcore.' + m.name) for m in pkgutil.iter_modules(gptcore.__path__)]; "
        "from gptcore import generate, load_bundle, preset; "
        "print(all(callable(f) and not hasattr(f, '__path__') and type(f).__name__ != 'module' "
        "for f in (generate, load_bundle, preset)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
