"""The Tokenizer: llama.cpp's llama_tokenize / llama_detokenize / llama_token_to_piece for GGUF vocabularies.

Owns: the public API (contract in shared/contracts.md) and the glue between special-token splitting,
the SPM or BPE encoder, BOS/EOS and the SPM leading-space rule. Must not read files itself beyond
handing a path or an open file to core/tokenizer/gguf_meta.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from core.errors import TokenizerError
from core.tokenizer.bpe import BpeEncoder
from core.tokenizer.detokenize import Detokenizer
from core.tokenizer.gguf_meta import metadata_from_reader, read_metadata
from core.tokenizer.special import SpecialSplitter
from core.tokenizer.spm import SPACE, SpmEncoder
from core.tokenizer.stream import StreamDecoder
from core.tokenizer.vocab import ATTR_CONTROL, Vocab, load_vocab

_PREFIX = "tokenizer."


class Tokenizer:
    """Text <-> token ids exactly as llama.cpp does for `tokenizer.ggml.model` llama (SPM) and gpt2 (BPE)."""

    def __init__(self, vocab: Vocab, chat_template: str | None = None) -> None:
        self.vocab = vocab
        self.chat_template = chat_template     # the file's `tokenizer.chat_template` (Jinja), if any
        self._encoder = SpmEncoder(vocab) if vocab.model == "llama" else BpeEncoder(vocab)
        self._special = SpecialSplitter(vocab)
        self._detok = Detokenizer(vocab)
        self._nl_id: int | None = None

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "<metadata>") -> Tokenizer:
        template = meta.get("tokenizer.chat_template")
        if isinstance(template, bytes):
            template = template.decode("utf-8", "replace")
        return cls(load_vocab(meta, source), template if isinstance(template, str) else None)

    @classmethod
    def from_reader(cls, reader: Any) -> Tokenizer:
        """From an open GGUF: a core.gguf_file.GGUFFile (its parsed metadata) or a `gguf.GGUFReader`."""
        source = getattr(reader, "path", None) or getattr(getattr(reader, "data", None), "filename", "<gguf>")
        return cls.from_metadata(metadata_from_reader(reader, _PREFIX), str(source))

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """From a GGUF file; parses only its metadata (much faster than building a GGUFReader)."""
        return cls.from_metadata(read_metadata(path, _PREFIX), str(path))

    # -- properties -----------------------------------------------------------------------------------
    n_vocab = property(lambda self: self.vocab.n_vocab)
    bos_id = property(lambda self: self.vocab.bos_id)
    eos_id = property(lambda self: self.vocab.eos_id)
    eot_id = property(lambda self: self.vocab.eot_id)
    eog_ids = property(lambda self: self.vocab.eog_ids)
    add_bos = property(lambda self: self.vocab.add_bos)
    add_eos = property(lambda self: self.vocab.add_eos)
    model = property(lambda self: self.vocab.model)
    pre = property(lambda self: self.vocab.pre)

    @property
    def nl_id(self) -> int:
        """The newline token: `<0x0A>` for SPM, the tokenization of "\\n" otherwise (llama.cpp's rule)."""
        if self._nl_id is None:
            if isinstance(self._encoder, SpmEncoder):
                self._nl_id = self._encoder.byte_id(0x0A)
            else:
                ids = self.encode("\n", add_bos=False)
                self._nl_id = ids[0] if ids else -1
        return self._nl_id

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self.vocab.attrs[self._detok.check_id(token_id)] & ATTR_CONTROL)

    def token_text(self, token_id: int) -> str:
        """The token as stored in the vocabulary (e.g. '▁Hello', 'ĠHello', '<0x0A>')."""
        return self.vocab.tokens[self._detok.check_id(token_id)]

    # -- encode ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False,
               add_eos: bool | None = None) -> list[int]:
        """llama_tokenize. `add_bos=None` follows the model (add_special=true); `add_bos=False` adds
        neither BOS nor EOS (add_special=false); `add_eos=None` follows the model unless add_bos is False.

        Raises:
            TokenizerError: text not a str, BOS/EOS asked for but the vocabulary has none.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"cannot tokenize {type(text).__name__}, expected str")
        return self._encode_fragments(self._special.split(text, parse_special), add_bos, add_eos)

    def encode_parts(self, parts: Sequence[tuple[str, bool]], add_bos: bool | None = None) -> list[int]:
        """Tokenize text made of parts, with special tokens recognised only in the parts flagged True.

        For chat prompts: template text (True) may hold `<|im_start|>` and the like; what a user typed
        (False) never becomes a control token, whatever it contains. Raw text between special tokens is
        tokenized as one fragment across part boundaries, so `encode_parts([(t, True)])` equals
        `encode(t, parse_special=True)`, `encode_parts([(t, False)])` equals `encode(t)`, and a mix equals
        `encode("".join(texts), parse_special=True)` when no control-token text lies in or across a False
        part.
        BOS/EOS as in encode(); the SPM leading space goes before text that starts the whole or follows a
        special token.

        Raises:
            TokenizerError: a part that is not a (str, bool) pair, or as encode().
        """
        parts = list(parts)
        for k, part in enumerate(parts):
            if not (isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str)
                    and isinstance(part[1], bool)):
                raise TokenizerError(f"encode_parts: part {k} is {part!r}, expected a (str, bool) pair")
        return self._encode_fragments(self._special.split_parts(parts), add_bos, None)

    def _encode_fragments(self, fragments: list[str | int], add_bos: bool | None,
                          add_eos: bool | None) -> list[int]:
        v = self.vocab
        want_bos = v.add_bos if add_bos is None else add_bos
        want_eos = (v.add_eos and add_bos is not False) if add_eos is None else add_eos
        out: list[int] = []
        if want_bos:
            if v.bos_id < 0:
                raise TokenizerError(f"{v.source}: BOS requested but the vocabulary has no BOS token")
            out.append(v.bos_id)
        try:
            if isinstance(self._encoder, SpmEncoder):
                self._encode_spm(fragments, out)
            else:
                for frag in fragments:
                    out.extend([frag] if isinstance(frag, int) else self._encoder.encode(frag))
        except UnicodeEncodeError as exc:
            raise TokenizerError(f"text is not valid Unicode at position {exc.start}") from None
        if want_eos:
            if v.eos_id < 0:
                raise TokenizerError(f"{v.source}: EOS requested but the vocabulary has no EOS token")
            out.append(v.eos_id)
        return out

    def _encode_spm(self, fragments: list[str | int], out: list[int]) -> None:
        # llama.cpp: a raw fragment gets a leading space when it starts the text or follows a special token.
        prev_special = True
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.vocab.add_space_prefix and prev_special:
                frag = " " + frag
            out.extend(self._encoder.encode(frag.replace(" ", SPACE)))
            prev_special = False

    # -- decode ---------------------------------------------------------------------------------------
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """llama_token_to_piece(id, lstrip=0, special): the token's bytes (may be part of a character)."""
        return self._detok.piece(token_id, special)

    def decode_bytes(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = False,
                     strip_leading_space: bool | None = None) -> bytes:
        return self._detok.detokenize(ids, remove_special, unparse_special, strip_leading_space)

    def decode(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = False,
               strip_leading_space: bool | None = None) -> str:
        """llama_detokenize(ids, remove_special, unparse_special) as text (invalid UTF-8 -> U+FFFD).

        `strip_leading_space=False` keeps the leading space of the first piece (for text continuing
        earlier text); None follows llama.cpp.

        Raises:
            TokenizerError: an id outside [0, n_vocab).
        """
        return self.decode_bytes(ids, remove_special, unparse_special, strip_leading_space).decode(
            "utf-8", "replace")

    def stream_decoder(self, remove_special: bool = False, unparse_special: bool = False,
                       strip_leading_space: bool | None = None) -> StreamDecoder:
        """A decoder fed one id at a time whose outputs join to `decode(ids, <same options>)`."""
        return StreamDecoder(self._detok, remove_special, unparse_special, strip_leading_space)

    def __repr__(self) -> str:
        v = self.vocab
        return (f"Tokenizer({v.model}/{v.pre}, n_vocab={v.n_vocab}, bos={v.bos_id}, eos={v.eos_id}, "
                f"add_bos={v.add_bos})")


__all__ = ["Tokenizer", "TokenizerError"]
