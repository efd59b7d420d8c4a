"""Tokenizers described by a Hugging Face `tokenizer.json`, run by the `tokenizers` library."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import TokenizerError, collect_stop_ids

if TYPE_CHECKING:
    import tokenizers

__all__ = ["HFTokenizer", "byte_level_decoder_table"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_level_decoder_table() -> dict[str, int]:
    """Character -> byte of GPT-2's byte-level alphabet.

    Byte-level BPE vocabularies spell every byte as a printable character: the 188 bytes that
    already print as themselves in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stay, and the other
    68 (control characters, space, NBSP, soft hyphen) are moved, in byte order, to U+0100 onwards.
    """
    keeps = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[str, int] = {}
    moved = 0
    for b in range(256):
        if b in keeps:
            table[chr(b)] = b
        else:
            table[chr(0x100 + moved)] = b
            moved += 1
    return table


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or a serialised AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: expected a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _pick_template(value: Any) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} of which we want "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def _decoder_kinds(serialised: str | bytes) -> set[str]:
    """Types of the decoder steps, read from the serialised decoder (Python hides them)."""
    decoder = json.loads(serialised) or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {s.get("type") for s in steps if isinstance(s, Mapping)}
    if any(s.get("type") == "Replace" and s.get("content") == " " for s in steps if isinstance(s, Mapping)):
        kinds.add("Metaspace")
    return {k for k in kinds if k}


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the `Tokenizer` protocol.

    `encode` never uses the tokenizer's post-processor: bos/eos are added only when asked for,
    so every backend behaves alike. `decode` keeps special tokens as text.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        special_tokens: Mapping[str, int] | None = None,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        add_bos_default: bool = False,
        vocab_size: int | None = None,
        name: str = "hf:<memory>",
    ) -> None:
        """Wrap an in-memory tokenizer. `special_tokens` defaults to its special added tokens;
        `vocab_size` defaults to the tokenizer's own count (pass it when ids are not dense)."""
        self._tok = tokenizer
        if special_tokens is None:
            special_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_tokens: dict[str, int] = dict(special_tokens)
        # `allow_special=False` encodes with the tokenizer's encode_special_tokens flag set (special-
        # token text as plain text), flipped under a lock since other threads may be encoding. (A
        # second copy of the tokenizer would cost a serialise/parse round trip, ~0.3-0.5 s of a
        # 49k-token vocabulary's load.)
        self._flag_lock = threading.Lock()
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.stop_ids: frozenset[int] = collect_stop_ids(eos_id, self.special_tokens, extra_stop_ids)
        self.chat_template = chat_template
        self.add_bos_default = add_bos_default
        self.name = name
        self._n_vocab = vocab_size if vocab_size is not None else tokenizer.get_vocab_size(with_added_tokens=True)
        kinds = _decoder_kinds(tokenizer.decoder.__getstate__() if tokenizer.decoder is not None else b"{}")
        self._byte_level = "ByteLevel" in kinds
        self._metaspace = not self._byte_level and bool(kinds & {"Metaspace", "ByteFallback"})
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load `tokenizer.json` (or a directory holding one) plus the config files beside it.

        tokenizer_config.json / special_tokens_map.json give bos/eos/pad, extra special tokens,
        `add_bos_token` and the chat template (also read from chat_template.jinja/.json);
        generation_config.json's `eos_token_id` adds stop ids.
        """
        import tokenizers

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file; expected a Hugging Face tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None
        folder = path.parent
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        smap = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}

        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            text = _token_text(entry)
            if text is not None and isinstance(entry, Mapping) and entry.get("special"):
                stated = int(key) if str(key).isdigit() else None
                _ensure_special(tok, text, specials, folder / "tokenizer_config.json", stated)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for source, where in ((smap, "special_tokens_map.json"), (config, "tokenizer_config.json")):
                listed = source.get(key) or []
                for entry in listed.values() if isinstance(listed, Mapping) else listed:
                    text = _token_text(entry)
                    if text is not None:
                        _ensure_special(tok, text, specials, folder / where)

        def special_id(key: str) -> int | None:
            text = _token_text(config.get(key)) or _token_text(smap.get(key))
            if text is None:
                return None
            i = tok.token_to_id(text)
            if i is None:
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {key} {text!r} is not in {path.name}")
            specials.setdefault(text, i)
            return i

        bos_id, eos_id, pad_id = special_id("bos_token"), special_id("eos_token"), special_id("pad_token")
        special_id("unk_token")

        template = _pick_template(config.get("chat_template"))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None and (folder / "chat_template.json").is_file():
            template = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))

        extra_stops: list[int] = []
        if (folder / "generation_config.json").is_file():
            eos = _read_json(folder / "generation_config.json").get("eos_token_id")
            extra_stops = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]

        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # No flag: the post-processor decides, as transformers does.
            with_special = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id

        return cls(
            tok,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            special_tokens=specials,
            extra_stop_ids=extra_stops,
            chat_template=template,
            add_bos_default=add_bos,
            name=f"hf:{path}",
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._n_vocab

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (special-token text is matched)."""
        return self._tok

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; special-token strings are only recognised with `allow_special`."""
        with self._flag_lock:
            self._tok.encode_special_tokens = not allow_special
            try:
                ids = self._tok.encode(text, add_special_tokens=False).ids
            finally:
                self._tok.encode_special_tokens = False
        if bos:
            ids.insert(0, self._require(self.bos_id, "bos"))
        if eos:
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`, special tokens included as text."""
        ids = [int(i) for i in ids]
        self._check(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token: byte-level characters mapped back to bytes, `<0xNN>` to byte NN,
        '▁' to a space, added/special tokens to their text."""
        cached = self._bytes_cache.get(id)
        if cached is not None:
            return cached
        self._check([id])
        out = self._compute_bytes(int(id))
        self._bytes_cache[id] = out
        return out

    def _compute_bytes(self, i: int) -> bytes:
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self._tok.id_to_token(i)
        if piece is None:
            return b""
        if self._byte_level:
            table = byte_level_decoder_table()
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)
        if self._metaspace:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self._tok.decode([i], skip_special_tokens=False).encode("utf-8")

    def _check(self, ids: Iterable[int]) -> None:
        for i in ids:
            if not 0 <= int(i) < self._n_vocab:
                raise TokenizerError(f"{self.name}: token id {i} is outside the vocabulary (0..{self._n_vocab - 1})")

    def _require(self, value: int | None, what: str) -> int:
        if value is None:
            raise TokenizerError(f"{self.name}: the tokenizer has no {what} token")
        return value

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _ensure_special(
    tok: tokenizers.Tokenizer, text: str, specials: dict[str, int], where: Path, stated: int | None = None
) -> None:
    """Record `text` as a special token, adding it to `tok` if the tokenizer.json lacks it.

    `stated` is the id the config file gives it; a token that would land elsewhere means the
    config and the tokenizer.json disagree, and guessing would shift ids silently.
    """
    from tokenizers import AddedToken

    i = tok.token_to_id(text)
    if i is None:
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        i = tok.token_to_id(text)
    if i is None or (stated is not None and i != stated):
        raise TokenizerError(f"{where}: special token {text!r} is id {stated}, but tokenizer.json gives it {i}")
    specials.setdefault(text, i)
