"""rank_pattern / alpha_pattern keys matched as PEFT matches them, in bounded time.

PEFT tests ``re.match(rf"(.*\\.)?({key})$", name)`` with the key taken from the adapter's
config, so an adapter can hand us a regular expression that backtracks for hours. Here a key is
parsed once (its length capped) and then matched by one of two engines with the same answer:

- Python's ``re`` when the pattern cannot backtrack badly: at most three constructs that give
  the matcher a choice (repeats of more than one, alternations) and none of them inside a repeat,
  so the work is at most polynomial of low degree in the name's length;
- otherwise a set-of-states simulation of the pattern's automaton (Thompson's construction),
  linear in the name's length times the automaton's size, for the regular constructs (literals,
  classes, alternation, groups, greedy and lazy repeats, anchors). A key that needs a
  backreference, a lookaround, an atomic group or a possessive repeat in such a pattern is
  refused with the key named.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

try:  # Python 3.11+
    from re import _constants as C, _parser as P
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse as P  # type: ignore[no-redef]

MAX_KEY_CHARS = 1000
MAX_STATES = 20_000
_CHOICES = 3  # choice points the backtracking engine may see (the (.*\.)? prefix is one)


class PatternRefused(ValueError):
    """A key that cannot be matched in bounded time; the message says why."""


def _wide(op, av) -> bool:
    return op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)) and av[1] > 1


def _children(op, av):
    if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)):
        return [av[2]]
    if op is C.SUBPATTERN:
        return [av[3]]
    if op is C.BRANCH:
        return list(av[1])
    if op in (C.ASSERT, C.ASSERT_NOT):
        return [av[1]]
    if op is getattr(C, "ATOMIC_GROUP", None):
        return [av]
    if op is C.GROUPREF_EXISTS:
        return [x for x in av[1:] if x is not None]
    return []


def _backtracking_safe(seq) -> bool:
    """At most _CHOICES choice points, none of them inside a repeat of more than one."""
    count = 0

    def walk(items, in_repeat: bool) -> bool:
        nonlocal count
        for op, av in items:
            choice = _wide(op, av) or op is C.BRANCH
            if choice:
                if in_repeat:
                    return False
                count += 1
            for sub in _children(op, av):
                if not walk(sub, in_repeat or _wide(op, av)):
                    return False
        return count <= _CHOICES

    return walk(seq, False)


# -- the automaton ----------------------------------------------------------------------------
def _category(cat) -> Callable[[str], bool]:
    table = {
        C.CATEGORY_DIGIT: str.isdecimal, C.CATEGORY_SPACE: str.isspace,
        C.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    }
    for neg, pos in ((C.CATEGORY_NOT_DIGIT, C.CATEGORY_DIGIT), (C.CATEGORY_NOT_SPACE, C.CATEGORY_SPACE),
                     (C.CATEGORY_NOT_WORD, C.CATEGORY_WORD)):
        table[neg] = (lambda f: lambda ch: not f(ch))(table[pos])
    if cat not in table:
        raise PatternRefused(f"it uses the class {cat}")
    return table[cat]


def _char_set(items) -> Callable[[str], bool]:
    negate = bool(items) and items[0][0] is C.NEGATE
    tests = []
    for op, av in items[1:] if negate else items:
        if op is C.LITERAL:
            tests.append(lambda ch, c=chr(av): ch == c)
        elif op is C.RANGE:
            tests.append(lambda ch, lo=av[0], hi=av[1]: lo <= ord(ch) <= hi)
        elif op is C.CATEGORY:
            tests.append(_category(av))
        else:
            raise PatternRefused(f"it uses {op} in a character class")
    return lambda ch: any(t(ch) for t in tests) != negate


class _Automaton:
    """States: ("char", test, next) | ("split", [next...]) | ("at", where, next) | ("match",)."""

    def __init__(self, seq):
        self.states: list = [("match",)]
        self.start = self._seq(seq, 0)

    def _new(self, state) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternRefused(f"its automaton passes {MAX_STATES} states")
        self.states.append(state)
        return len(self.states) - 1

    def _seq(self, items, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self._item(op, av, nxt)
        return nxt

    def _item(self, op, av, nxt: int) -> int:
        if op is C.LITERAL:
            return self._new(("char", lambda ch, c=chr(av): ch == c, nxt))
        if op is C.NOT_LITERAL:
            return self._new(("char", lambda ch, c=chr(av): ch != c, nxt))
        if op is C.ANY:
            return self._new(("char", lambda ch: ch != "\n", nxt))
        if op is C.IN:
            return self._new(("char", _char_set(av), nxt))
        if op is C.AT:
            if av not in (C.AT_BEGINNING, C.AT_BEGINNING_STRING, C.AT_END, C.AT_END_STRING,
                          C.AT_BOUNDARY, C.AT_NON_BOUNDARY):
                raise PatternRefused(f"it uses the anchor {av}")
            return self._new(("at", av, nxt))
        if op is C.BRANCH:
            return self._new(("split", [self._seq(alt, nxt) for alt in av[1]]))
        if op is C.SUBPATTERN:
            if av[1] or av[2]:
                raise PatternRefused("it sets flags inside a group")
            return self._seq(av[3], nxt)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # lazy or greedy: the same yes/no (possessive is not)
            lo, hi, body = av
            if hi is C.MAXREPEAT:
                loop = self._new(("split", []))
                self.states[loop] = ("split", [self._seq(body, loop), nxt])
                tail = loop
            else:
                tail = nxt
                for _ in range(hi - lo):
                    s = self._new(("split", []))
                    self.states[s] = ("split", [self._seq(body, tail), nxt])
                    tail = s
            for _ in range(lo):
                tail = self._seq(body, tail)
            return tail
        raise PatternRefused(f"it uses {str(op).lower().replace('_', ' ')}, which has no bounded-time match")

    def matches(self, s: str) -> bool:
        n = len(s)

        def word(i: int) -> bool:
            return 0 <= i < n and (s[i].isalnum() or s[i] == "_")

        def holds(where, i: int) -> bool:
            if where in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return i == 0
            if where is C.AT_END:
                return i == n or (i == n - 1 and s[-1] == "\n")
            if where is C.AT_END_STRING:
                return i == n
            if n == 0:
                return False  # as sre: neither \b nor \B holds in an empty string
            boundary = word(i - 1) != word(i)
            return boundary if where is C.AT_BOUNDARY else not boundary

        def closure(starts, i: int) -> list[int]:
            seen, out, stack = set(), [], list(starts)
            while stack:
                k = stack.pop()
                if k in seen:
                    continue
                seen.add(k)
                st = self.states[k]
                if st[0] == "split":
                    stack.extend(st[1])
                elif st[0] == "at":
                    if holds(st[1], i):
                        stack.append(st[2])
                else:
                    out.append(k)
            return out

        current = closure([self.start], 0)
        for i in range(n + 1):
            if any(self.states[k][0] == "match" for k in current):
                return True  # re.match: a match of a prefix is a match
            if i == n or not current:
                return False
            ch = s[i]
            current = closure([self.states[k][2] for k in current
                               if self.states[k][0] == "char" and self.states[k][1](ch)], i + 1)
        return False


@functools.lru_cache(maxsize=4096)
def compile_key(key: str) -> Callable[[str], bool]:
    """A function name -> bool equal to ``re.match(rf"(.*\\.)?({key})$", name) is not None``
    (a key that is not a valid regex matches as PEFT's users mean it: the name or its dotted
    tail). Raises PatternRefused for a key that cannot be matched in bounded time."""
    if len(key) > MAX_KEY_CHARS:
        raise PatternRefused(f"it is {len(key)} characters long (at most {MAX_KEY_CHARS})")
    full = rf"(.*\.)?({key})$"
    try:
        parsed = P.parse(full)
        rx = re.compile(full)
    except (re.error, RecursionError, OverflowError):
        return lambda name: name == key or name.endswith("." + key)
    try:
        if _backtracking_safe(list(parsed)):
            return lambda name: rx.match(name) is not None
        if parsed.state.flags & ~(C.SRE_FLAG_UNICODE):
            raise PatternRefused("it sets regex flags")
        return _Automaton(list(parsed)).matches
    except RecursionError:
        raise PatternRefused("its groups nest too deeply") from None
