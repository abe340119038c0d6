"""The docs' examples are executed: every `$ loratools ...` line of each page, in order, in a
fresh folder where `fx/` is the fixture tree. They cannot rot. `$ ln -s ...` lines (getting-started
links the real SmolLM2 GGUF) run in bash with the test's Python first on PATH, and the text shown
under a `$ loratools generate` line must be what it printed."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["getting-started.md", "rank-selection.md"] + sorted(f"commands/{p.name}" for p in (ROOT / "docs" / "commands").glob("*.md"))


def commands(page: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) for each `$ loratools` / `$ ln -s` line."""
    text = (ROOT / "docs" / page).read_text()
    out = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.startswith("$ loratools ") or line.startswith("$ ln -s "):
                out.append((line[2:].split("  #")[0].strip(), []))
            elif line.startswith("$ "):
                out.append(None)
            elif out and out[-1] is not None:
                out[-1][1].append(line)
    return [c for c in out if c is not None]


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(fx, tmp_path, page, run_cli):
    cmds = commands(page)
    if page.startswith("commands/") and not cmds:
        pytest.fail(f"{page} has no runnable example")
    os.symlink(fx, tmp_path / "fx")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for c, shown in cmds:
            if c.startswith("ln -s "):
                env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
                r = subprocess.run(["bash", "-c", c], env=env, capture_output=True, text=True)
                assert r.returncode == 0, f"{page}: `{c}` exited {r.returncode}: {r.stderr[-500:]}"
                continue
            argv = shlex.split(c)[1:]
            code, out, err = run_cli(*argv)
            assert code == 0, f"{page}: `{c}` exited {code}: {err[-500:]}"
            if argv[0] == "generate" and shown:
                assert out.rstrip("\n") == "\n".join(shown), f"{page}: `{c}` printed {out!r}, the page shows {shown!r}"
    finally:
        os.chdir(cwd)


def test_rank_selection_figure_exists():
    p = ROOT / "docs" / "img" / "spectrum.png"
    assert p.stat().st_size > 20_000 and "img/spectrum.png" in (ROOT / "docs" / "rank-selection.md").read_text()
