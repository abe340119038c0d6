"""ONNX Runtime: logits (and KV cache) from an exported model, optionally with an .onnx_adapter."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def session(model_dir: str | os.PathLike, device: str = "cpu"):
    import onnxruntime as ort

    path = Path(model_dir) / "model.onnx" if Path(model_dir).is_dir() else Path(model_dir)
    providers = ["CPUExecutionProvider"]
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers)


class Runner:
    """Runs one sequence (batch 1) through the model, with or without a KV cache."""

    def __init__(self, model_dir, adapter: str | os.PathLike | None = None, device: str = "cpu"):
        import onnxruntime as ort

        self.sess = session(model_dir, device)
        self.provider = self.sess.get_providers()[0]
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        # past_key_values.{layer}.key/.value; a layer that reuses another's keys and values has none
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.layers = sum(1 for n in self.past_names if n.endswith(".key"))
        self.run_options = None
        if adapter is not None:
            self.adapter = ort.LoraAdapter()
            self.adapter.Load(str(adapter))
            self.run_options = ort.RunOptions()
            self.run_options.add_active_adapter(self.adapter)
        meta = self.sess.get_modelmeta().custom_metadata_map
        # LongRoPE: past this length the long factors apply; the cache is recomputed once on crossing
        self.longrope = int(meta["longrope_original_max_position_embeddings"]) if "longrope_original_max_position_embeddings" in meta else None
        self.np_dtype = np.float16 if "float16" in self.inputs.get("past_key_values.0.key", self.sess.get_outputs()[0]).type else np.float32

    def _empty_past(self, b: int):
        feeds = {}
        for name in self.past_names:
            shape = self.inputs[name].shape
            feeds[name] = np.zeros((b, shape[1], 0, shape[3]), dtype=self.np_dtype)
        return feeds

    def run(self, ids: Sequence[int], past: dict | None = None, start: int = 0):
        """Logits for ``ids`` following ``past`` (presents of earlier calls) at position ``start``."""
        ids = np.asarray([list(ids)], dtype=np.int64)
        s = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, start + s), dtype=np.int64),
                 "position_ids": np.arange(start, start + s, dtype=np.int64)[None]}
        if self.layers:
            feeds.update(past if past is not None else self._empty_past(1))
        outs = self.sess.run(None, feeds, self.run_options)
        names = [o.name for o in self.sess.get_outputs()]
        res = dict(zip(names, outs))
        present = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"][0].astype(np.float32), present

    def greedy(self, ids: Sequence[int], n: int, cache: bool = True) -> list[int]:
        out = list(ids)
        if not cache or not self.layers:  # the whole sequence again at every step
            for _ in range(n):
                logits, _ = self.run(out)
                out.append(int(logits[-1].argmax()))
            return out[len(ids):]
        logits, past = self.run(out)
        for _ in range(n):
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            if self.longrope is not None and len(out) - 1 <= self.longrope < len(out):
                # the sequence grows past LongRoPE's original length: keys cached under the short
                # factors are recomputed with the long ones (as transformers' generate does)
                logits, past = self.run(out)
            else:
                logits, past = self.run([nxt], past, len(out) - 1)
        return out[len(ids):]
