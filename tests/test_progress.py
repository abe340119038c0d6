"""Issue 19, items 8-9: progress (a line per stage when stderr is not a terminal, --quiet silences
it), Ctrl-C during train (a checkpoint of the completed step and the exact --resume command),
and the small things (resize without a rule, inspect's layer order, validate's runtime column,
spectrum plots). On the fixture models."""
import json
import os
import re
import shlex
import signal
import threading
import time

import pytest

from loratools import api

STAGE = re.compile(r"^loratools: \[[^\]]+\]")


def stage_lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if STAGE.match(l)]


@pytest.fixture(scope="module")
def merged(fx, tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    api.merge(fx / "models" / "llama", [fx / "adapters" / "llama-rslora"], d / "merged")
    return d / "merged"


def test_validate_logs_one_line_per_stage_and_quiet_silences_it(fx, merged, run_cli):
    m, a = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    code, out, err = run_cli("validate", "--base", m, "-a", a, merged, merged, "--tokens", "2")
    assert code == 0, err
    lines = stage_lines(err)
    # reference, the base without the adapter, two candidates, PEFT's independent reference: no more
    assert len(lines) == 5, err
    assert lines[0].startswith("loratools: [validate] reference: ") and lines[0].endswith("prompts")
    assert "candidate 1/2 merged" in lines[2] and "candidate 2/2 merged" in lines[3]
    assert "\r" not in err  # no bar redrawn into a log
    # the table's runtime column is never cut
    assert "torch (cpu)" in out
    code, out, err = run_cli("validate", "--base", m, "-a", a, merged, "--tokens", "2", "--quiet")
    assert code == 0 and stage_lines(err) == [], err


def test_validate_extraction_and_export_onnx_log_their_stages(fx, tmp_path, run_cli):
    m, t = fx / "models" / "llama", fx / "models" / "llama-tuned"
    assert run_cli("extract", "--base", m, "--tuned", t, "-o", tmp_path / "ex", "--rank", "4", "--quiet")[0] == 0
    code, out, err = run_cli("validate-extraction", "--base", m, "--tuned", t, "-a", tmp_path / "ex")
    assert code == 0, err
    names = [l.split("] ")[1].split(":")[0] for l in stage_lines(err)]
    assert names == ["module errors", "the fine-tune's whole delta", "tuned model", "base model", "base + adapter"], err
    code, out, err = run_cli("export", "onnx", m, "-o", tmp_path / "onnx", "--no-cache")
    assert code == 0, err
    lines = stage_lines(err)
    assert len(lines) == 2 and "tracing the graph" in lines[0] and re.search(r"weights: \d+ tensors$", lines[1]), err
    code, out, err = run_cli("export", "onnx", m, "-o", tmp_path / "onnx2", "--no-cache", "--quiet")
    assert code == 0 and err == "", err
    # other streaming commands log their stage the same way
    code, out, err = run_cli("merge", "--base", m, "-a", fx / "adapters" / "llama-rslora", "-o", tmp_path / "m")
    assert code == 0 and len(stage_lines(err)) == 1 and stage_lines(err)[0].startswith("loratools: [merge] "), err


def _interrupt_when(path, lines: int, timeout: float = 120.0):
    """SIGINT to this process (the main thread runs train) once ``path`` holds ``lines`` lines."""
    def watch():
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if path.is_file() and path.read_text().count("\n") >= lines:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def test_ctrl_c_during_train_checkpoints_and_prints_the_resume_command(fx, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", str(fx / "models" / "llama"), "--data", str(fx / "data" / "chat-train.jsonl"),
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "40", "--rank", "4", "--device", "cpu"]
    th = _interrupt_when(tmp_path / "out.train" / "metrics.jsonl", 2)
    code, out, err = run_cli(*args, "-o", "out")
    th.join()
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    m = re.match(r"loratools: train interrupted at step (\d+)/40; the checkpoint of step (\d+) is in out\.train/checkpoints: "
                 r"continue exactly with: loratools (.*)$", last)
    assert m and m.group(1) == m.group(2), err
    step = int(m.group(1))
    assert 2 <= step < 40
    assert shlex.split(m.group(3)) == args + ["-o", "out", "--resume"]
    assert (tmp_path / "out.train" / "checkpoints" / f"step-{step:06d}").is_dir()
    assert (tmp_path / "out.train" / "metrics.jsonl").read_text().count("\n") == step
    # the printed command finishes the run, with the losses of an uninterrupted one
    code, out, err = run_cli(*shlex.split(m.group(3)))
    assert code == 0, err
    code, out, err = run_cli(*args, "-o", "whole")
    assert code == 0, err
    got = json.loads((tmp_path / "out" / "train_report.json").read_text())["losses"]
    want = json.loads((tmp_path / "whole" / "train_report.json").read_text())["losses"]
    assert len(got) == len(want) == 40
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5


def test_resize_without_a_rule_is_a_one_line_error(fx, tmp_path, run_cli):
    code, out, err = run_cli("resize", fx / "adapters" / "llama-rslora", "-o", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--rank" in err and "--budget" in err, err
    assert not (tmp_path / "r").exists()
    # --max-rank alone caps every module at N (not the old silent rank 16)
    code, out, err = run_cli("resize", fx / "adapters" / "llama-rslora", "-o", tmp_path / "r", "--max-rank", "3", "--json")
    assert code == 0, err
    assert max(m["rank"] for m in json.loads(out)["modules"].values()) == 3


def test_inspect_sorts_layers_numerically(tmp_path, run_cli):
    import torch

    from loratools.adapter import Adapter, LoraModule
    from loratools.formats.peft import write_peft

    mods = {f"model.layers.{i}.self_attn.q_proj": LoraModule(torch.ones(1, 4), torch.ones(4, 1), 1.0) for i in range(12)}
    write_peft(Adapter(modules=mods), tmp_path / "a", num_layers=12)
    code, out, err = run_cli("inspect", tmp_path / "a", "--json")
    assert code == 0, err
    assert [int(n.split(".")[2]) for n in json.loads(out)["modules"]] == list(range(12))


def test_spectrum_plots_show_the_whole_spectrum_within_1600_px(fx, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from loratools.ops.extract import extract
    from loratools.ops.factor import RankRule

    m, t = fx / "models" / "llama", fx / "models" / "llama-tuned"
    _, rep = extract(m, t, None, RankRule("rank", 2), full_spectra=True)
    for mod, (S, total, k) in rep["_spectra"].items():
        shape = rep["modules"].get(mod, rep["embeddings"].get(mod, {})).get("shape")
        if shape and k:
            assert S.numel() == min(shape) and k == 2, (mod, S.numel(), shape)  # past the chosen rank
    api.extract(m, t, tmp_path / "ex", RankRule("rank", 2), plot=tmp_path / "s.png")
    h, w = mpimg.imread(tmp_path / "s.png").shape[:2]
    assert w <= 1600 and h <= 1600, (w, h)
    api.inspect(tmp_path / "ex", plot=tmp_path / "i.png")
    assert mpimg.imread(tmp_path / "i.png").shape[1] <= 1600
