"""Text generation: the reference decoder (base + adapters unmerged, fp32, KV cache), a ``.gguf``
in llama.cpp, or an ONNX export in ONNX Runtime.

Greedy by default; sampling (temperature, top-p, a seed) runs on the reference only and is
deterministic: the next-token distribution is computed in float64 on the CPU and drawn with a
seeded torch.Generator. ``--chat`` renders the messages with the model's own chat template (the
sandboxed renderer of loratools.train.data, the one training uses; a GGUF's
tokenizer.chat_template) and appends the generation prompt. Generation stops at the model's
end-of-sequence token (generation_config.json / config.json eos_token_id, a GGUF's
tokenizer.ggml.eos_token_id) unless ``stop_at_eos`` is off."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from .errors import IncompatibleError, InputError


def parse_chat(chat) -> list[dict]:
    """A list of {role, content} messages from a list, a JSON string, or a .json file holding
    the list (or {"messages": [...]})."""
    where = None
    if isinstance(chat, (str, os.PathLike)):
        s = str(chat)
        if not s.lstrip().startswith(("[", "{")):
            p = Path(s)
            if not p.is_file():
                raise InputError("--chat takes a JSON list of messages or a .json file holding one; no such file", p)
            where, s = p, p.read_text(encoding="utf-8-sig")
        try:
            chat = json.loads(s)
        except json.JSONDecodeError as e:
            raise InputError(f"--chat: malformed JSON ({e.msg})", where) from None
    if isinstance(chat, dict) and "messages" in chat:
        chat = chat["messages"]
    if not isinstance(chat, list) or not chat or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in chat):
        raise InputError("--chat: expected a non-empty JSON list of {\"role\": ..., \"content\": ...} messages", where)
    return chat


def _eos_ids(model_dir: Path) -> set[int]:
    from . import readpolicy

    for f in ("generation_config.json", "config.json"):
        p = model_dir / f
        if p.exists():
            cfg = readpolicy.read_json(p, what=f)
            v = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
            if isinstance(v, list) and all(isinstance(x, int) for x in v):
                return set(v)
            if isinstance(v, int) and not isinstance(v, bool):
                return {v}
    return set()


class _HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json's chat template) of a checkpoint or ONNX folder."""

    def __init__(self, model_dir: Path):
        from . import readpolicy

        p = model_dir / "tokenizer.json"
        if not p.exists() and not p.is_symlink():
            raise InputError("no tokenizer.json: generate needs the model's tokenizer", model_dir)
        self.dir, self.tok = model_dir, readpolicy.load_tokenizer(p)
        self.eos = _eos_ids(model_dir)

    def encode(self, text: str, special: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def template(self):
        from .train.data import ChatTemplate

        return ChatTemplate(self.dir)


class _GGUFTokenizer:
    def __init__(self, path: Path):
        from .formats.gguf_model import field, open_gguf
        from .runtimes import llamacpp

        self.path, self.llm = path, llamacpp.load(path, vocab_only=True)
        r = open_gguf(path)
        eos = field(r, "tokenizer.ggml.eos_token_id")
        self.eos = {int(eos)} if eos is not None else set()
        self.source = field(r, "tokenizer.chat_template")
        toks = field(r, "tokenizer.ggml.tokens") or []
        name = lambda k: toks[int(field(r, k))] if field(r, k) is not None and int(field(r, k)) < len(toks) else None  # noqa: E731
        self.specials = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id")}

    def encode(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def template(self):
        from .train.data import ChatTemplate

        if not isinstance(self.source, str) or not self.source:
            raise InputError("the GGUF has no tokenizer.chat_template; --chat needs one", self.path)
        return ChatTemplate(self.path.parent, source=self.source, specials=self.specials, where=self.path)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One draw from softmax(logits / T) restricted to the top-p nucleus, in float64 on the CPU."""
    p = torch.softmax(logits.detach().double().cpu() / temperature, -1)
    if top_p < 1.0:
        sp, si = p.sort(descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p  # the smallest prefix whose mass reaches top_p (the first always)
        p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(p / p.sum(), 1, generator=gen))


def decode(model, ids, n, dev, pick=None, eos=(), stop=False) -> tuple[torch.Tensor, list[int]]:
    """(the prompt's logits, up to ``n`` new token ids) from the reference decoder with its KV cache;
    ``pick`` chooses each token from the last logits (greedy when None); ``stop``: end at a token in
    ``eos``. LongRoPE: the cache is recomputed once past the original length, as transformers' generate
    does."""
    from .formats.onnx_model import longrope_switch

    switch = longrope_switch(model.cfg)
    pick = pick or (lambda lg: int(lg.argmax()))
    out: list[int] = []
    with torch.no_grad():
        first, past = model(torch.tensor([list(ids)], device=dev))
        logits = first
        while len(out) < n:
            nxt = pick(logits[0, -1])
            out.append(nxt)
            if len(out) == n or (stop and nxt in eos):
                break
            seq = list(ids) + out
            if switch is not None and len(seq) - 1 <= switch < len(seq):
                logits, past = model(torch.tensor([seq], device=dev))
            else:
                logits, past = model(torch.tensor([[nxt]], device=dev), past=past)
    return first, out


def _reference(model_dir, ids, n, adapters, weights, device, sampler, eos, stop):
    from .device import pick_device
    from .models.decoder import load_model

    dev = pick_device(device)
    model = load_model(model_dir, adapters=adapters, weights=weights, device=str(dev))
    _, out = decode(model, ids, n, dev, sampler, eos, stop)
    return out, f"reference (torch fp32, {dev})"


def generate(model, adapters: Sequence = (), weights: Sequence[float] | None = None, prompt: str | None = None,
             chat=None, max_new_tokens: int = 32, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, device: str = "auto", stop_at_eos: bool = True) -> dict:
    from . import api

    if (prompt is None) == (chat is None):
        raise InputError("give exactly one of a prompt or a chat")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise InputError("sampling needs --temperature > 0 and 0 < --top-p <= 1")
    path = Path(model)
    if not path.exists():
        raise InputError("no such file or directory", path)
    messages = parse_chat(chat) if chat is not None else None
    kind = "gguf" if path.suffix == ".gguf" else "onnx" if path.is_dir() and (path / "model.onnx").is_file() else "reference"
    if kind != "reference":
        if not greedy:
            raise IncompatibleError(f"sampling runs on the reference decoder only; {kind} candidates generate greedily", path)
        if len(adapters) > 1 or weights:
            raise IncompatibleError(f"a {kind} model takes at most one adapter (its own format), unweighted", path)
    tok = _GGUFTokenizer(path) if kind == "gguf" else _HFTokenizer(path)
    if messages is not None:
        text = tok.template().render(messages, add_generation_prompt=True)
        ids = tok.encode(text, special=False)  # the template writes its own special tokens (as transformers)
    else:
        text, ids = prompt, tok.encode(prompt, special=True)
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    if kind == "gguf":
        from .runtimes import llamacpp

        ad = Path(adapters[0]) if adapters else None
        if ad is not None and ad.suffix != ".gguf":
            raise IncompatibleError("a GGUF model takes a GGUF adapter (.gguf)", ad)
        _, new = llamacpp.run(path, ids, max_new_tokens, ad, gpu=str(device) == "cuda")
        runtime = "llama.cpp"
    elif kind == "onnx":
        from .runtimes.onnxruntime import Runner

        ad = Path(adapters[0]) if adapters else None
        if ad is not None and ad.suffix != ".onnx_adapter":
            raise IncompatibleError("an ONNX model takes an ONNX Runtime adapter (.onnx_adapter)", ad)
        r = Runner(path, adapter=ad, device="cuda" if str(device) == "cuda" else "cpu")
        new = r.greedy(ids, max_new_tokens)
        runtime = f"onnxruntime ({r.provider})"
    else:
        loaded = [api.load_adapter(a, base=path) for a in adapters]
        if weights is not None and len(weights) != len(loaded):
            raise IncompatibleError(f"{len(weights)} weights given for {len(loaded)} adapters")
        sampler = None
        if not greedy:
            gen = torch.Generator().manual_seed(int(seed))
            sampler = lambda lg: _sample(lg, temperature, top_p, gen)  # noqa: E731
        new, runtime = _reference(path, ids, max_new_tokens, loaded, weights, device, sampler, tok.eos, stop_at_eos)
    if stop_at_eos:  # greedy runtimes ran the full length: the same tokens up to the first end token
        cut = next((i for i, t in enumerate(new) if t in tok.eos), None)
        new = new[:cut + 1] if cut is not None else new
    decoded = tok.decode(new)
    if kind == "gguf":
        tok.llm.close()
    return {"model": str(model), "adapters": [str(a) for a in adapters], "runtime": runtime,
            "mode": "greedy" if greedy else "sample", "temperature": None if greedy else temperature,
            "top_p": None if greedy else top_p, "seed": None if greedy else seed,
            "prompt": text, "prompt_ids": list(ids), "ids": list(new), "text": decoded,
            "stopped_at_eos": stop_at_eos and bool(new) and new[-1] in tok.eos}
