"""Grammar-constrained decoding: JSON mode (OpenAI's ``response_format: {"type": "json_object"}``).

The answer is kept a valid prefix of a JSON object at every token: a token is chosen only if its
bytes keep the text so far a prefix of some JSON object (RFC 8259), and the answer ends as soon as
the object closes. The check is a pushdown automaton over bytes (:class:`JSONPrefix`), run on the
candidates in the order the sampler would pick them: greedy takes the most likely token that
passes; sampling draws from the distribution restricted to the tokens that pass (a drawn token
that fails is taken out and the draw repeated, which is the same distribution). Most steps check
one candidate, since the model mostly writes valid JSON once asked to.

Bytes, not characters: a byte-level BPE token may hold part of a UTF-8 character. JSON's
structure is ASCII, so bytes >= 0x80 are accepted inside strings only (the model completes the
character with the next tokens). Runs of whitespace outside strings are capped (``MAX_WHITESPACE``):
a model asked for JSON can otherwise loop on newlines until ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["JSONPrefix", "JSONConstraint", "TokenTable", "token_table", "constrained_next"]

MAX_WHITESPACE = 24  # consecutive whitespace bytes outside strings

# Modes of the automaton.
(VALUE, OBJ_FIRST, OBJ_KEY, COLON, AFTER, ARR_FIRST, STR, ESC, HEX, LIT,
 NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_ESIGN, NUM_EXP, DONE) = range(19)
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_NUMBER_ENDS = (NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP)  # where a number may stop


class JSONPrefix:
    """Whether bytes fed so far are a prefix of one JSON value (an object, with ``object_only``),
    followed by nothing but whitespace. ``feed`` returns False (and leaves the state unusable) on
    the first byte that no JSON text could continue with; ``done`` once the value is complete."""

    __slots__ = ("stack", "mode", "key", "rest", "ws", "object_only")

    def __init__(self, object_only: bool = True) -> None:
        self.stack = ""  # open containers: "o" object, "a" array
        self.mode = VALUE
        self.key = False  # the string being read is an object key
        self.rest = b""  # bytes still owed by a literal (true/false/null) or hex digits of a \\u
        self.ws = 0
        self.object_only = object_only

    def copy(self) -> JSONPrefix:
        """An independent copy (to try a token without committing to it)."""
        new = JSONPrefix.__new__(JSONPrefix)
        new.stack, new.mode, new.key, new.rest, new.ws, new.object_only = (
            self.stack, self.mode, self.key, self.rest, self.ws, self.object_only)
        return new

    @property
    def done(self) -> bool:
        """The top-level value is complete."""
        return self.mode == DONE

    def feed_bytes(self, data: bytes) -> bool:
        """Feed several bytes; False at the first that breaks the grammar."""
        return all(self.feed(b) for b in data)

    def feed(self, b: int) -> bool:  # noqa: C901 - one branch per automaton mode, as the grammar reads
        """Feed one byte; False if no JSON text continues this way."""
        mode = self.mode
        if mode == STR:
            if b == 0x22:  # closing quote
                self.mode = COLON if self.key else AFTER
                self.ws = 0
                return True
            if b == 0x5C:
                self.mode = ESC
                return True
            return b >= 0x20  # control characters must be escaped
        if mode == ESC:
            if b in _ESCAPES:
                self.mode = STR
                return True
            if b == ord("u"):
                self.mode, self.rest = HEX, b"xxxx"
                return True
            return False
        if mode == HEX:
            if b not in _HEXDIGITS:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self.mode = STR
            return True
        if mode == LIT:
            if b != self.rest[0]:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self._closed_value()
            return True
        if NUM_MINUS <= mode <= NUM_EXP:
            nxt = self._number(mode, b)
            if nxt is not None:
                self.mode = nxt
                return True
            if mode not in _NUMBER_ENDS:
                return False
            self._closed_value()  # the number ended at this byte: read it as what follows a value
            return self.feed(b)
        if b in _WS:
            self.ws += 1
            return self.ws <= MAX_WHITESPACE
        self.ws = 0
        if mode == DONE:
            return False
        if mode in (VALUE, ARR_FIRST):
            if mode == ARR_FIRST and b == ord("]"):
                return self._close("a")
            return self._value_start(b)
        if mode in (OBJ_FIRST, OBJ_KEY):
            if b == 0x22:
                self.mode, self.key = STR, True
                return True
            return mode == OBJ_FIRST and b == ord("}") and self._close("o")
        if mode == COLON:
            if b == ord(":"):
                self.mode = VALUE
                return True
            return False
        if mode == AFTER:
            top = self.stack[-1]
            if b == ord(","):
                self.mode = OBJ_KEY if top == "o" else VALUE
                return True
            return self._close(top) if b == (ord("}") if top == "o" else ord("]")) else False
        return False

    def _value_start(self, b: int) -> bool:
        if self.object_only and not self.stack and b != ord("{"):
            return False
        if b == ord("{"):
            self.stack += "o"
            self.mode = OBJ_FIRST
        elif b == ord("["):
            self.stack += "a"
            self.mode = ARR_FIRST
        elif b == 0x22:
            self.mode, self.key = STR, False
        elif b in _LITERALS:
            self.mode, self.rest = LIT, _LITERALS[b]
        elif b == ord("-"):
            self.mode = NUM_MINUS
        elif b == ord("0"):
            self.mode = NUM_ZERO
        elif b in _DIGITS:
            self.mode = NUM_INT
        else:
            return False
        return True

    @staticmethod
    def _number(mode: int, b: int) -> int | None:
        """The next number mode after byte ``b``, or None if ``b`` does not continue the number."""
        digit = b in _DIGITS
        if mode == NUM_MINUS:
            return NUM_ZERO if b == ord("0") else NUM_INT if digit else None
        if mode in (NUM_ZERO, NUM_INT, NUM_FRAC):
            if digit and mode != NUM_ZERO:
                return mode
            if b == ord(".") and mode != NUM_FRAC:
                return NUM_DOT
            return NUM_E if b in (ord("e"), ord("E")) else None
        if mode == NUM_DOT:
            return NUM_FRAC if digit else None
        if mode == NUM_E:
            return NUM_ESIGN if b in (ord("+"), ord("-")) else NUM_EXP if digit else None
        if mode in (NUM_ESIGN, NUM_EXP):
            return NUM_EXP if digit else None
        return None

    def _closed_value(self) -> None:
        self.mode = AFTER if self.stack else DONE
        self.ws = 0

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack = self.stack[:-1]
        self._closed_value()
        return True


class TokenTable:
    """Each token id's bytes, and which ids are special (never part of the JSON text)."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        specials = set(getattr(tokenizer, "special_tokens", {}).values())
        self.bytes = []
        for i in range(n_vocab):
            try:
                self.bytes.append(b"" if i in specials else tokenizer.token_bytes(i))
            except (KeyError, IndexError, ValueError):  # an id past the tokenizer's table
                self.bytes.append(b"")
        self.special = frozenset(specials)


_TABLES: dict[tuple[int, int], TokenTable] = {}


def token_table(tokenizer: Any, n_vocab: int) -> TokenTable:
    """The (cached) :class:`TokenTable` of ``tokenizer``'s first ``n_vocab`` ids."""
    key = (id(tokenizer), n_vocab)
    if key not in _TABLES:
        _TABLES[key] = TokenTable(tokenizer, n_vocab)
    return _TABLES[key]


class JSONConstraint:
    """One sequence's JSON state: which next tokens are allowed, and when the object is complete."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table
        self.state = JSONPrefix(object_only=True)

    @property
    def done(self) -> bool:
        """The object has closed: the answer ends here."""
        return self.state.done

    def allows(self, token: int) -> bool:
        """Whether ``token`` keeps the text a prefix of a JSON object (special and empty tokens never)."""
        data = self.table.bytes[token] if 0 <= token < len(self.table.bytes) else b""
        return bool(data) and self.state.copy().feed_bytes(data)

    def commit(self, token: int) -> None:
        """Advance past ``token`` (one that :meth:`allows`; anything else is ignored)."""
        nxt = self.state.copy()
        if nxt.feed_bytes(self.table.bytes[token] if 0 <= token < len(self.table.bytes) else b"\x00"):
            self.state = nxt


def constrained_next(processed: Tensor, temperature: float, generator: torch.Generator | None,
                     constraint: JSONConstraint, first: int, raw: Tensor | None = None) -> int:
    """The next id of one row under ``constraint``, given ``first``, the sampler's own unconstrained
    choice from the (V,) ``processed`` logits: kept if allowed, else the most likely allowed id
    (greedy) or a fresh draw from the distribution restricted to allowed ids (sampling). Should
    the filters (top-k/top-p/min-p) leave no allowed id, the most likely allowed id of ``raw``."""
    if constraint.allows(first):
        return first
    if temperature == 0.0:
        return _best_allowed(processed, constraint)
    probs = processed.softmax(dim=-1).to(torch.float64)
    probs[first] = 0.0
    for _ in range(8):  # rejection: the first allowed draw is a draw of the restricted distribution
        total = float(probs.sum())
        if total <= 0.0:
            break
        u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * total
        token = int(torch.searchsorted(probs.cumsum(0), u, right=True).clamp_(max=probs.numel() - 1))
        if constraint.allows(token):
            return token
        probs[token] = 0.0
    # Few allowed ids are likely: weigh the allowed ones among those left and draw once.
    left = torch.nonzero(probs > 0).flatten().tolist()
    ok = [t for t in left if constraint.allows(t)]
    if ok:
        weights = probs[ok]
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
        return ok[pick]
    return _best_allowed(processed if raw is None else raw, constraint)


def _best_allowed(logits: Tensor, constraint: JSONConstraint) -> int:
    """The allowed id of highest logit (the top 64 first: the likely case)."""
    top = torch.topk(logits, min(64, logits.numel())).indices.tolist()
    for t in top:
        if constraint.allows(t):
            return t
    for t in torch.argsort(logits, descending=True).tolist()[64:]:
        if constraint.allows(t):
            return t
    raise ValueError("JSON mode: no token of the vocabulary continues the JSON text")
