"""benchmarks/gpu_check.sh runs on CPU too (small settings): every path validates."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("llama_cpp")


def test_gpu_check_script_runs_and_all_paths_pass(tmp_path):
    env = {**os.environ, "QUICK": "1", "PY": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "gc")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = (tmp_path / "gc" / "summary.md").read_text()
    assert "all passed" in summary and summary.count("| pass |") == 8
    assert "resize rank 64 -> 16" in summary and "loratools / PEFT" in summary
