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
    finally:
        llm.close()
