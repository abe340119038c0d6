"""User experience: plots, --json on every command, shell completion."""
import json
import os
import subprocess
import sys

import pytest

from loratools.cli import cli


def test_plots_are_written(fx, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    code, out, err = run_cli("inspect", fx / "adapters" / "llama-patterns", "--plot", tmp_path / "a.png")
    assert code == 0, err
    code, out, err = run_cli("extract", "--base", fx / "models" / "llama", "--tuned", fx / "models" / "llama-tuned",
                             "-o", tmp_path / "x", "--energy", "0.9", "--plot", tmp_path / "b.png", "--json")
    assert code == 0, err and json.loads(out)["plot"] == str(tmp_path / "b.png")
    for p in ("a.png", "b.png"):
        data = (tmp_path / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    code, _, err = run_cli("inspect", fx / "models" / "llama", "--plot", tmp_path / "c.png")
    assert code == 4 and "checkpoint" in err


def test_plot_without_matplotlib_is_a_clear_message(fx, tmp_path, run_cli, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    code, _, err = run_cli("inspect", fx / "adapters" / "llama-patterns", "--plot", tmp_path / "a.png")
    assert code == 4 and "pip install 'loratools[plot]'" in err


def _commands(group, prefix=()):
    import click
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_command_that_reports_has_json():
    missing = [" ".join(n) for n, c in _commands(cli) if n != ("completion",)
               and "--json" not in [o for p in c.params for o in getattr(p, "opts", [])]]
    assert not missing, missing


def test_shell_completion():
    r = subprocess.run([sys.executable, "-m", "loratools", "completion", "bash"], capture_output=True, text=True)
    assert r.returncode == 0 and "_LORATOOLS_COMPLETE=bash_complete" in r.stdout
    env = {**os.environ, "_LORATOOLS_COMPLETE": "bash_complete", "COMP_WORDS": "loratools exp", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-c", "from loratools.cli import cli; cli(prog_name='loratools')"],
                       capture_output=True, text=True, env=env)
    assert "export" in r.stdout


def test_plot_path_is_checked_before_any_work(fx, tmp_path, run_cli):
    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    code, _, err = run_cli("extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "ex", "--rank", "2",
                           "--plot", tmp_path / "spec.safetensors")
    assert code == 2 and "--plot must name" in err and not (tmp_path / "ex").exists()
    (tmp_path / "old.png").write_bytes(b"x")
    code, _, err = run_cli("inspect", fx / "adapters" / "llama-rslora", "--plot", tmp_path / "old.png")
    assert code == 5 and "already exists" in err and (tmp_path / "old.png").read_bytes() == b"x"
    code, _, err = run_cli("inspect", fx / "adapters" / "llama-rslora", "--plot", tmp_path / "old.png", "--overwrite")
    assert code == 0, err
    code, _, err = run_cli("extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "ex2", "--rank", "2",
                           "--plot", tmp_path / "ex2" / "spec.png", "--quiet")
    assert code == 0 and (tmp_path / "ex2" / "spec.png").stat().st_size > 1000, err


def test_bad_option_values_exit_2(fx, tmp_path, run_cli):
    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    for args in (["extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "e", "--energy", "1.5"],
                 ["resize", fx / "adapters" / "llama-rslora", "-o", tmp_path / "r", "--rank", "0"]):
        code, _, err = run_cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, code, err)


def test_combine_rank_with_an_exact_method_is_refused(fx, tmp_path, run_cli):
    a = fx / "adapters" / "llama-rslora"
    code, _, err = run_cli("combine", a, a, "-o", tmp_path / "c", "--method", "cat", "--rank", "4")
    assert code == 2 and "--rank does not apply" in err and not (tmp_path / "c").exists()
