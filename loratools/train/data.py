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


TEMPLATE_OUTPUT_CAP = 8 * 1024 * 1024  # characters one render may produce (a real prompt is far shorter)
TEMPLATE_SECONDS = 10.0                 # wall time one render may take (a real one takes milliseconds)
TEMPLATE_MEMORY = 1024**3               # address space one render may add to the process
TEMPLATE_RANGE = 1_000_000              # iterations all range() calls of one render may yield


class _TemplateLimit(Exception):
    """A chat template ran past one of its bounds (time, output, memory, loop steps)."""


class ChatTemplate:
    """The model's chat template, rendered in a sandbox as transformers renders it, with bounds:
    output size, wall time (in the main thread), address space, range() steps, and the size of
    one string or list repetition or power; any failure is one line naming the template's file.
    ``source`` (with ``specials``): a template read elsewhere (a GGUF's tokenizer.chat_template),
    ``where`` the file errors name."""

    def __init__(self, model_dir: Path, source: str | None = None, specials: dict | None = None,
                 where: Path | None = None):
        from .. import readpolicy

        model_dir = Path(model_dir)
        tc = model_dir / "tokenizer_config.json"
        jinja_file = model_dir / "chat_template.jinja"
        src, self.where = source, where or model_dir
        if src is not None:
            pass
        elif jinja_file.exists() or jinja_file.is_symlink():
            src, self.where = readpolicy.read_text(jinja_file, model_dir, readpolicy.TEMPLATE_CAP), jinja_file
        elif tc.exists():
            src, self.where = (_read_config(tc) or {}).get("chat_template"), tc
            if isinstance(src, list):
                src = next((t.get("template") for t in src if isinstance(t, dict) and t.get("name") == "default"), None)
        if not src or not isinstance(src, str):
            raise InputError("the model has no chat template (tokenizer_config.json chat_template or chat_template.jinja); "
                             "chat data needs one", model_dir)
        import jinja2

        env = _bounded_environment()
        try:
            self.template = env.from_string(src)
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError, OverflowError) as e:
            raise InputError(f"the chat template does not parse: {_why(e)}", self.where) from None
        if specials is not None:
            self.specials = dict(specials)
            return
        cfg = (_read_config(tc) or {}) if tc.exists() else {}
        self.specials = {k: _content(cfg.get(k)) for k in ("bos_token", "eos_token")}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            with _render_bounds():
                out, n = [], 0
                for chunk in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    tools=None, documents=None, **self.specials):
                    n += len(chunk)
                    if n > TEMPLATE_OUTPUT_CAP:
                        raise _TemplateLimit(f"its output passes {TEMPLATE_OUTPUT_CAP} characters")
                    out.append(chunk)
                return "".join(out)
        except InputError as e:
            raise InputError(e.message, e.path or self.where) from None
        except Exception as e:  # noqa: BLE001 - whatever a template does wrong is the template's failure
            raise InputError(f"the chat template fails on this chat: {_why(e)}", self.where) from None


def _why(e: BaseException) -> str:
    import jinja2

    if isinstance(e, _TemplateLimit):
        return f"stopped, {e}"
    if isinstance(e, MemoryError):
        return f"stopped, it needs more than {TEMPLATE_MEMORY // 1024**2} MiB of memory"
    if isinstance(e, RecursionError):
        return "stopped, it recurses too deeply"
    if isinstance(e, (jinja2.TemplateError, TypeError, ValueError)):
        return " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _bounded_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_OUTPUT_CAP:
                        raise _TemplateLimit(f"a repetition would make {len(seq) * n} items")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * left.bit_length() > 64 * 1024:
                raise _TemplateLimit(f"the power {left} ** {right} is too large")
            return super().call_binop(context, operator, left, right)

    # as transformers renders chat templates: lenient undefined names (templates test `tools`,
    # `message.tool_calls`, ...), loop controls, raise_exception and strftime_now
    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["range"] = _bounded_range
    # transformers' tojson: key order kept, no HTML escaping, non-ASCII as is
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    return env


_steps = [0]


def _bounded_range(*args):
    """range() as the sandbox has it (at most MAX_RANGE items), every item counted against the
    render's budget of range steps when iterated."""
    from jinja2.sandbox import safe_range

    return _CountedRange(safe_range(*args))


class _CountedRange:
    """A range whose iteration counts steps (len, indexing and ``in`` as a range's)."""

    def __init__(self, r: range):
        self.r = r

    def __len__(self):
        return len(self.r)

    def __getitem__(self, i):
        x = self.r[i]
        return _CountedRange(x) if isinstance(x, range) else x

    def __contains__(self, x):
        return x in self.r

    def __reversed__(self):
        return iter(_CountedRange(self.r[::-1]))

    def __iter__(self):
        for x in self.r:
            _steps[0] += 1
            if _steps[0] > TEMPLATE_RANGE:
                raise _TemplateLimit(f"its loops pass {TEMPLATE_RANGE} range() steps")
            yield x


class _render_bounds:
    """Time (SIGALRM, main thread only) and address-space bounds around one render."""

    def __enter__(self):
        import signal
        import threading

        _steps[0] = 0
        self._alarm = self._limit = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            def expired(signum, frame):
                raise _TemplateLimit(f"it ran for more than {TEMPLATE_SECONDS:g} seconds")

            self._alarm = signal.signal(signal.SIGALRM, expired)
            signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
        try:
            import resource

            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            want = used + TEMPLATE_MEMORY
            if (soft == resource.RLIM_INFINITY or want < soft) and (hard == resource.RLIM_INFINITY or want <= hard):
                resource.setrlimit(resource.RLIMIT_AS, (want, hard))
                self._limit = (soft, hard)
        except (ImportError, OSError, ValueError):
            pass
        return self

    def __exit__(self, *exc):
        import signal

        if self._alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._alarm)
        if self._limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self._limit)


def _raise(msg):
    raise InputError(f"chat template: {msg}")


def _read_config(p: Path):
    from .. import readpolicy

    return readpolicy.read_json(p, what=p.name)


def _content(v):
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, model_dir: Path):
        from .. import readpolicy

        p = model_dir / "tokenizer.json"
        if not p.exists() and not p.is_symlink():
            raise InputError("no tokenizer.json: training needs the model's tokenizer", model_dir)
        self.tok = readpolicy.load_tokenizer(p, model_dir)
        self.path = p
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = (_read_config(cfg_path) or {}) if cfg_path.exists() else {}
        eos = _content(cfg.get("eos_token"))
        self.eos_id = self.tok.token_to_id(eos) if isinstance(eos, str) and eos else None

    def max_id(self) -> int:
        """The largest token id the tokenizer can produce (its vocabulary and added tokens)."""
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1)

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


LINE_CHARS = 1024 * 1024  # the longest JSONL line / text paragraph read (at least 64 characters per --seq-len token)


def _lines(path: Path, cap: int):
    """(line number, line with its \\n) of a UTF-8 file, newlines read as Python's text mode reads them (\\r\\n
    and \\r are \\n), each line read with a cap of ``cap`` characters: never the whole file,
    never more than the cap of an over-long line."""
    from .. import readpolicy

    real = path.resolve()  # the user's own data file, wherever a link takes it; but a regular file
    fd, _ = readpolicy.open_model_file(real, real.parent, cap=1 << 62)
    with open(fd, encoding="utf-8-sig", newline=None) as f:  # a byte-order mark is not data
        n = 0
        while True:
            n += 1
            try:
                line = f.readline(cap + 2)
            except UnicodeDecodeError as e:
                raise InputError(f"not UTF-8 text (line {n} or near it: {e.reason})", path) from None
            if not line:
                return
            if len(line.removesuffix("\n")) > cap:
                raise InputError(f"line {n} is longer than {cap} characters, the longest line loratools reads "
                                 "(a longer --seq-len raises it: 64 characters per token)", path)
            yield n, line


def load(path: str | os.PathLike, model_dir: str | os.PathLike, seq_len: int | None = None) -> Dataset:
    """Read a .txt or .jsonl file into tokenized examples with loss masks. Lines (and .txt
    paragraphs) are bounded by ``LINE_CHARS`` or 64 characters per ``seq_len`` token, whichever is more."""
    path, model_dir = Path(path), Path(model_dir)
    if not path.is_file():
        raise InputError("no such file", path)
    cap = max(LINE_CHARS, 64 * (seq_len or 0))
    tok = Tokenizer(model_dir)
    examples: list[Example] = []
    kinds: dict[str, int] = {}
    any_text = False
    if path.suffix in (".jsonl", ".json"):
        chat = None
        for n, line in _lines(path, cap):
            line = line.removesuffix("\n")
            if not line.strip():
                continue
            any_text = True
            try:
                rec = json.loads(line, parse_int=_bounded_int)
            except json.JSONDecodeError as e:
                raise InputError(f"line {n}: malformed JSON ({e.msg}, column {e.colno})", path) from e
            except (ValueError, RecursionError) as e:
                raise InputError(f"line {n}: malformed JSON ({_why(e)})", path) from None
            if isinstance(rec, dict) and "messages" in rec and chat is None:
                chat = ChatTemplate(model_dir)
            ex = _example_from_record(rec, f"{path}: line {n}", tok, chat, model_dir)
            kind = "chat" if "messages" in rec else "prompt/completion" if "prompt" in rec else "text"
            kinds[kind] = kinds.get(kind, 0) + 1
            if ex.ids:
                examples.append(ex)
    else:
        # paragraphs are the pieces between "\n\n" (as text.split("\n\n") cuts them), gathered line by line
        buf = ""
        for n, line in _lines(path, cap):
            buf += line
            while "\n\n" in buf:
                para, buf = buf.split("\n\n", 1)
                if para.strip():
                    ids, _ = tok.encode(para)
                    examples.append(Example(ids, [True] * len(ids)))
            if len(buf) > cap:
                raise InputError(f"the paragraph ending at line {n} is longer than {cap} characters, the longest "
                                 "loratools reads (a longer --seq-len raises it: 64 characters per token)", path)
            any_text = any_text or bool(line.strip())
        if buf.strip():
            ids, _ = tok.encode(buf)
            examples.append(Example(ids, [True] * len(ids)))
        kinds["text"] = len(examples)
    if not any_text:
        raise InputError("the data file is empty", path)
    if not examples:
        raise InputError("no usable examples in the data file", path)
    if not any(any(e.mask) for e in examples):
        raise InputError("no token carries loss (every example is prompt only)", path)
    return Dataset(examples, {"file": str(path), "examples": len(examples), "kinds": kinds, "eos_id": tok.eos_id,
                              "tokens": sum(len(e.ids) for e in examples),
                              "loss_tokens": sum(sum(e.mask) for e in examples)})


def _bounded_int(text: str) -> int:
    from ..readpolicy import _bounded_int as b

    return b(text)


def check_ids(ds: Dataset, rows: int, tokenizer: Path) -> None:
    """Refuse token ids the model's embedding (``rows`` rows) has no row for."""
    top = max((max(e.ids) for e in ds.examples if e.ids), default=-1)
    if ds.report.get("eos_id") is not None:
        top = max(top, ds.report["eos_id"])
    if top >= rows:
        raise InputError(f"the tokenizer gives token id {top} but the model's embedding has {rows} rows "
                         "(an added token past the embedding)", tokenizer)


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
