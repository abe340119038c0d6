"""`make demo` runs scripts/demo.sh: the whole pipeline on a fixture; its summary must say every path passed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("llama_cpp")


def test_demo_pipeline_passes_every_path(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(tmp_path / "demo")], cwd=ROOT,
                       env={**os.environ, "PY": sys.executable}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.split("== summary")[1]
    assert summary.count("%  pass") == 5 and "FAIL" not in summary and "all candidates passed" in summary
    for step in ("train", "extract", "resize", "combine", "merge", "export gguf", "export onnx", "import gguf"):
        assert f"+ loratools {step}" in r.stdout
