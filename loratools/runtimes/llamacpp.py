"""llama.cpp (through llama-cpp-python): logits of a GGUF model, optionally with a GGUF LoRA."""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np

from ..errors import LoratoolsError


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    try:
        import llama_cpp
    except ImportError as e:
        raise LoratoolsError("llama.cpp validation needs llama-cpp-python: pip install 'loratools[llama]' "
                             "(see DEVELOPERS.md for the build flags)") from e
    return llama_cpp


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs to fd 2 from C; silence it around model loading."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load(model: str | os.PathLike, lora: str | os.PathLike | None = None, lora_scale: float = 1.0,
         n_ctx: int = 512, gpu: bool = False, vocab_only: bool = False):
    llama_cpp = _require()
    # validation wants the model's own precision: keep the KV cache in F32 (llama.cpp defaults to F16)
    kw = dict(model_path=str(model), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
              n_threads=max(1, os.cpu_count() or 1), n_gpu_layers=-1 if gpu else 0, vocab_only=vocab_only,
              type_k=0, type_v=0, flash_attn=False)
    if lora is not None:
        kw.update(lora_path=str(lora), lora_scale=lora_scale)
    try:
        with _quiet():
            return llama_cpp.Llama(**kw)
    except (ValueError, RuntimeError) as e:
        where = f"{model}" + (f" + {lora}" if lora else "")
        raise LoratoolsError(f"{where}: llama.cpp refused to load it ({e})") from e


def logits(model: str | os.PathLike, ids: Sequence[int], lora: str | os.PathLike | None = None,
           lora_scale: float = 1.0, gpu: bool = False) -> np.ndarray:
    """Logits (len(ids), vocab) in fp32 for one sequence, evaluated in one batch."""
    llm = load(model, lora, lora_scale, n_ctx=max(64, len(ids) + 8), gpu=gpu)
    try:
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def tokenize(model: str | os.PathLike, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
    llm = load(model, vocab_only=True)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
    finally:
        llm.close()


def run(model: str | os.PathLike, ids: Sequence[int], n_new: int = 0, lora: str | os.PathLike | None = None,
        gpu: bool = False) -> tuple[np.ndarray, list[int]]:
    """(logits for ``ids``, greedy continuation of ``n_new`` tokens), one model load."""
    llm = load(model, lora, 1.0, n_ctx=max(64, len(ids) + n_new + 8), gpu=gpu)
    try:
        return _greedy(llm, ids, n_new)
    finally:
        llm.close()


def _greedy(llm, ids: Sequence[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    llm.reset()
    llm.eval(list(ids))
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    out: list[int] = []
    nxt = int(logits[-1].argmax())
    for k in range(n_new):
        out.append(nxt)
        if k + 1 == n_new:
            break
        llm.eval([nxt])
        nxt = int(np.asarray(llm.scores[len(ids) + k], dtype=np.float32).argmax())
    return logits, out


# -- isolation ----------------------------------------------------------------------------------
class Crashed(Exception):
    """llama.cpp ended the child process that evaluated a GGUF (an assertion abort, a fault):
    ``reason`` is the last meaningful line it wrote."""

    def __init__(self, reason: str, code: int):
        self.reason, self.code = reason, code
        super().__init__(reason)


def _reason(stderr: str, code: int) -> str:
    import re
    import signal

    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    key = [ln for ln in lines if "GGML_ASSERT" in ln or "error" in ln.lower() or "abort" in ln.lower()]
    line = re.sub(r"^\S*/", "", (key or lines or [""])[-1])[:300]  # a source path: its file name (ops.cpp:4132: ...)
    how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_
           else f"exit {code}")
    return f"llama.cpp {how}" + (f": {line}" if line else "")


def run_isolated(model: str | os.PathLike, ids_list: Sequence[Sequence[int]], n_new: int = 0,
                 lora: str | os.PathLike | None = None, gpu: bool = False, ticks=None) -> list[tuple[np.ndarray, list[int]]]:
    """``run`` for each prompt of ``ids_list`` (one model load), in a child process: an abort in
    llama.cpp (an assertion on a bad hyper-parameter) ends the child, not this process, and raises
    Crashed with its reason; a file llama.cpp refuses to load raises LoratoolsError as ``load``
    does. ``ticks``: an iterable advanced once per prompt done (a progress bar)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    ticks = iter(ticks if ticks is not None else ())
    with tempfile.TemporaryDirectory(prefix="loratools-llama-") as d:
        d = Path(d)
        (d / "request.json").write_text(json.dumps({"model": str(model), "lora": None if lora is None else str(lora),
                                                    "gpu": gpu, "n_new": n_new, "ids": [list(map(int, i)) for i in ids_list]}))
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort: no gdb attach and backtrace
        with open(d / "stderr", "wb") as err:
            p = subprocess.Popen([sys.executable, "-m", "loratools.runtimes.llamacpp", str(d)], stdout=subprocess.PIPE,
                                 stderr=err, stdin=subprocess.DEVNULL, env=env)
            try:
                for line in p.stdout:
                    if line.strip() == b"done":
                        next(ticks, None)
                p.wait()
            except BaseException:
                p.kill()
                p.wait()
                raise
            finally:
                p.stdout.close()
        for _ in ticks:
            pass
        if p.returncode == 3:  # load() refused the file: its one line
            raise LoratoolsError((d / "refused").read_text())
        if p.returncode != 0:
            raise Crashed(_reason((d / "stderr").read_text(errors="replace"), p.returncode), p.returncode)
        out = np.load(d / "logits.npz")
        greedy = json.loads((d / "greedy.json").read_text())
        return [(out[f"l{i}"], greedy[i]) for i in range(len(ids_list))]


def _child(folder: str) -> int:
    import json
    import sys
    from pathlib import Path

    d = Path(folder)
    req = json.loads((d / "request.json").read_text())
    try:
        llm = load(req["model"], req["lora"], 1.0, n_ctx=max(64, max(map(len, req["ids"])) + req["n_new"] + 8),
                   gpu=req["gpu"])
    except LoratoolsError as e:
        (d / "refused").write_text(str(e))
        return 3
    logits, greedy = {}, []
    try:
        for i, ids in enumerate(req["ids"]):
            logits[f"l{i}"], out = _greedy(llm, ids, req["n_new"])
            greedy.append(out)
            sys.stdout.write("done\n")
            sys.stdout.flush()
    finally:
        llm.close()
    np.savez(d / "logits.npz", **logits)
    (d / "greedy.json").write_text(json.dumps(greedy))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_child(sys.argv[1]))
