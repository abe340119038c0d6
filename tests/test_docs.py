"""The docs' examples are executed: every `$ loratools ...` line of each page, in order, in a
fresh folder where `fx/` is the fixture tree. They cannot rot."""
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["getting-started.md", "rank-selection.md"] + sorted(f"commands/{p.name}" for p in (ROOT / "docs" / "commands").glob("*.md"))


def commands(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    out = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.startswith("$ loratools "):
                out.append(line[2:].split("  #")[0].strip())
    return out


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(fx, tmp_path, page, run_cli):
    cmds = commands(page)
    if page.startswith("commands/") and not cmds:
        pytest.fail(f"{page} has no runnable example")
    os.symlink(fx, tmp_path / "fx")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for c in cmds:
            argv = shlex.split(c)[1:]
            code, out, err = run_cli(*argv)
            assert code == 0, f"{page}: `{c}` exited {code}: {err[-500:]}"
    finally:
        os.chdir(cwd)


def test_rank_selection_figure_exists():
    p = ROOT / "docs" / "img" / "spectrum.png"
    assert p.stat().st_size > 20_000 and "img/spectrum.png" in (ROOT / "docs" / "rank-selection.md").read_text()
