"""Training data: plain text, JSONL with ``text``, prompt/completion pairs, and chat ``messages``.

Every example becomes token ids plus a loss mask. Text examples train on every token; for
prompt/completion only the completion carries loss (every token that ends inside it, so one
that merges a prompt's trailing space with the completion's first word counts), and for chats
only the assistant turns
(found by rendering the conversation with the model's chat template turn by turn, and mapping
the assistant spans' characters to tokens through the tokenizer's offsets). Examples are
packed back to back into sequences of ``seq_len`` tokens (an end-of-sequence token between
them; the last row is padded with end tokens that carry no loss); an example longer than
``seq_len`` is truncated to its first ``seq_len`` tokens and counted in the data report.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is predicted with loss


@dataclass
class Dataset:
    examples: list[Example]
    report: dict = field(default_factory=dict)


class ChatTemplate:
    """The model's chat template, rendered in a sandbox as transformers renders it. ``source``
    (with ``specials``): a template read elsewhere (a GGUF's tokenizer.chat_template)."""

    def __init__(self, model_dir: Path, source: str | None = None, specials: dict | None = None):
        model_dir = Path(model_dir)
        tc = model_dir / "tokenizer_config.json"
        src = source
        if src is not None:
            pass
        elif (model_dir / "chat_template.jinja").is_file():
            src = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        elif tc.is_file():
            src = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(src, list):
                src = next((t["template"] for t in src if t.get("name") == "default"), None)
        if not src:
            raise InputError("the model has no chat template (tokenizer_config.json chat_template or chat_template.jinja); "
                             "chat data needs one", model_dir)
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # as transformers renders chat templates: lenient undefined names (templates test `tools`,
        # `message.tool_calls`, ...), loop controls, raise_exception and strftime_now
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        # transformers' tojson: key order kept, no HTML escaping, non-ASCII as is
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        self.where = model_dir
        try:
            self.template = env.from_string(src)
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template does not parse: {e}", model_dir) from None
        if specials is not None:
            self.specials = dict(specials)
            return
        cfg = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
        self.specials = {k: _content(cfg.get(k)) for k in ("bos_token", "eos_token")}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.specials)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise InputError(f"the chat template fails on this chat: {e}", self.where) from None


def _raise(msg):
    raise InputError(f"chat template: {msg}")


def _content(v):
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as T

        p = model_dir / "tokenizer.json"
        if not p.is_file():
            raise InputError("no tokenizer.json: training needs the model's tokenizer", model_dir)
        self.tok = T.from_file(str(p))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        eos = _content(cfg.get("eos_token"))
        self.eos_id = self.tok.token_to_id(eos) if eos else None

    def encode(self, text: str):
        e = self.tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets


def _mask_from_spans(offsets, spans) -> list[bool]:
    """True for each token whose character range lies within one of ``spans``."""
    out = []
    for a, b in offsets:
        out.append(any(s <= a and b <= e and b > a for s, e in spans))
    return out


def _example_from_record(rec, where, tok: Tokenizer, chat: "ChatTemplate | None", model_dir: Path) -> Example:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                  and isinstance(m.get("role"), str) for m in msgs):
            raise InputError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError(f"{where}: the chat has no assistant turn, so nothing to learn from")
        if chat is None:
            chat = ChatTemplate(model_dir)
        full = chat.render(msgs)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = chat.render(msgs[:i], add_generation_prompt=True)
            upto = chat.render(msgs[: i + 1])
            if not full.startswith(upto) or not upto.startswith(before):
                raise InputError(f"{where}: the chat template does not render turn by turn as a prefix; "
                                 "assistant turns cannot be located")
            spans.append((len(before), len(upto)))
        ids, offsets = tok.encode(full)
        return Example(ids, _mask_from_spans(offsets, spans))
    if "prompt" in rec or "completion" in rec:
        p, c = rec.get("prompt"), rec.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise InputError(f"{where}: 'prompt' and 'completion' must both be strings")
        # encoded together (the text the model will see), and a token carries loss when it ends
        # inside the completion: a prompt's trailing space that merges into the completion's first
        # token ("Answer: " + "Paris" -> "ĠParis") leaves that token with its loss
        ids, offsets = tok.encode(p + c)
        ex = Example(ids, [b > len(p) for _, b in offsets])
        if tok.eos_id is not None:
            ex.ids.append(tok.eos_id)
            ex.mask.append(True)
        return ex
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise InputError(f"{where}: 'text' must be a string")
        ids, _ = tok.encode(rec["text"])
        return Example(ids, [True] * len(ids))
    raise InputError(f"{where}: a record needs 'text', 'prompt'/'completion' or 'messages' (got {sorted(rec)[:5]})")


def load(path: str | os.PathLike, model_dir: str | os.PathLike) -> Dataset:
    """Read a .txt or .jsonl file into tokenized examples with loss masks."""
    path, model_dir = Path(path), Path(model_dir)
    if not path.is_file():
        raise InputError("no such file", path)
    tok = Tokenizer(model_dir)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not data
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e})", path) from e
    if not text.strip():
        raise InputError("the data file is empty", path)
    examples: list[Example] = []
    kinds: dict[str, int] = {}
    if path.suffix in (".jsonl", ".json"):
        chat = None
        # lines end at \n only: str.splitlines would also split at U+2028/U+2029/U+0085, which JSON
        # strings may hold unescaped
        for n, line in enumerate((l.removesuffix("\r") for l in text.split("\n")), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"line {n}: malformed JSON ({e.msg}, column {e.colno})", path) from e
            if isinstance(rec, dict) and "messages" in rec and chat is None:
                chat = ChatTemplate(model_dir)
            ex = _example_from_record(rec, f"{path}: line {n}", tok, chat, model_dir)
            kind = "chat" if "messages" in rec else "prompt/completion" if "prompt" in rec else "text"
            kinds[kind] = kinds.get(kind, 0) + 1
            if ex.ids:
                examples.append(ex)
    else:
        for para in (p for p in text.split("\n\n") if p.strip()):
            ids, _ = tok.encode(para)
            examples.append(Example(ids, [True] * len(ids)))
        kinds["text"] = len(examples)
    if not examples:
        raise InputError("no usable examples in the data file", path)
    if not any(any(e.mask) for e in examples):
        raise InputError("no token carries loss (every example is prompt only)", path)
    return Dataset(examples, {"file": str(path), "examples": len(examples), "kinds": kinds, "eos_id": tok.eos_id,
                              "tokens": sum(len(e.ids) for e in examples),
                              "loss_tokens": sum(sum(e.mask) for e in examples)})


def pack(ds: Dataset, seq_len: int, eos_id: int | None, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack examples (in ``order``) into (n, seq_len) input ids and labels (−100 = no loss).

    Examples longer than ``seq_len`` are truncated. Labels are the inputs shifted left, so
    ``labels[t]`` is the token predicted at position t."""
    stream, smask = [], []
    truncated = 0
    for i in order:
        e = ds.examples[i]
        ids, mask = e.ids, e.mask
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated += 1
        stream += ids
        smask += mask
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            stream.append(eos_id)
            smask.append(False)
    ds.report["truncated"] = truncated
    n = max(1, -(-(len(stream) - 1) // seq_len))  # the last, partial row is padded (no loss), not dropped
    need = n * seq_len + 1
    if len(stream) < need:
        pad = need - len(stream)
        stream += [eos_id or 0] * pad
        smask += [False] * pad
    x = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    y = torch.tensor(stream[1: n * seq_len + 1]).view(n, seq_len)
    m = torch.tensor(smask[1: n * seq_len + 1]).view(n, seq_len)
    return x, torch.where(m, y, torch.full_like(y, -100))
