"""Chat templates: a conversation rendered to prompt text the way HF transformers and llama-cpp-python do it.

Owns: compiling a Jinja chat template (the GGUF's `tokenizer.chat_template`, a built-in, or a
`--chat-template` file) in jinja2's immutable sandbox; rendering it; cutting a rendering into template
text and message contents (special tokens are parsed only in the former); and the text each new turn
feeds in llama-cli's conversation mode. Must not tokenize; the only I/O is reading a template file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import TemplateError, one_line

Message = Mapping[str, Any]      # {"role": ..., "content": ...}
Part = tuple[str, bool]          # (text, True: template text / False: a message's content)
_Span = tuple[str, "int | None"]  # (text, index of the message whose content it is, or None)

DEFAULT_TEMPLATE = "chatml"
NO_TEMPLATE_NOTICE = "model has no chat template; using chatml"

# Built-in templates, named as llama.cpp's --chat-template names them. Each reproduces, byte for byte,
# what llm_chat_apply_template() in llama.cpp's src/llama-chat.cpp writes for that name (the llama2 and
# mistral families ignore add_generation_prompt there, and so here). `trim(' \t\n\v\f\r')` is llama.cpp's
# trim(): C isspace(), not Python's Unicode whitespace. "alpaca" has no entry in llama-chat.cpp: it is
# llama.cpp main's -ins wrapping (chat/state.py's INSTRUCT_PREFIX/SUFFIX), the system message as preamble.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        r"{% for message in messages %}"
        r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        r"{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama2": (
        r"{{ '[INST] ' }}{% for message in messages %}"
        r"{% if not loop.first and loop.previtem['role'] not in ('system', 'user') %}{{ '[INST] ' }}{% endif %}"
        r"{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
        r"{% elif message['role'] == 'user' %}{{ message['content'] + ' [/INST]' }}"
        r"{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "llama2-sys": (
        r"{{ '[INST] ' }}{% for message in messages %}"
        r"{% if not loop.first and loop.previtem['role'] not in ('system', 'user') %}{{ '[INST] ' }}{% endif %}"
        r"{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
        r"{% elif message['role'] == 'user' %}{{ message['content'] + ' [/INST]' }}"
        r"{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "llama3": (
        r"{% for message in messages %}"
        r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        r"{{ (message['content'] | trim(' \t\n\v\f\r')) + '<|eot_id|>' }}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "mistral-v1": (
        r"{% for message in messages %}"
        r"{% if loop.first or loop.previtem['role'] not in ('system', 'user') %}{{ ' [INST] ' }}{% endif %}"
        r"{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        r"{% elif message['role'] == 'user' %}{{ message['content'] + ' [/INST]' }}"
        r"{% else %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "mistral-v3": (
        r"{% for message in messages %}"
        r"{% if loop.first or loop.previtem['role'] not in ('system', 'user') %}{{ '[INST] ' }}{% endif %}"
        r"{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        r"{% elif message['role'] == 'user' %}{{ message['content'] + '[/INST]' }}"
        r"{% else %}{{ ' ' + (message['content'] | trim(' \t\n\v\f\r')) + '</s>' }}{% endif %}{% endfor %}"),
    "mistral-v3-tekken": (
        r"{% for message in messages %}"
        r"{% if loop.first or loop.previtem['role'] not in ('system', 'user') %}{{ '[INST]' }}{% endif %}"
        r"{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        r"{% elif message['role'] == 'user' %}{{ message['content'] + '[/INST]' }}"
        r"{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "mistral-v7": (
        r"{% for message in messages %}"
        r"{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}"
        r"{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
        r"{% else %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "mistral-v7-tekken": (
        r"{% for message in messages %}"
        r"{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
        r"{% elif message['role'] == 'user' %}{{ '[INST]' + message['content'] + '[/INST]' }}"
        r"{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"),
    "phi3": (
        r"{% for message in messages %}"
        r"{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "zephyr": (
        r"{% for message in messages %}"
        r"{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|endoftext|>\n' }}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "gemma": (  # no system role: system texts (trimmed) open the next non-model turn
        r"{% set ns = namespace(system='') %}{% for message in messages %}"
        r"{% if message['role'] == 'system' %}"
        r"{% set ns.system = ns.system + (message['content'] | trim(' \t\n\v\f\r')) %}"
        r"{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        r"{{ '<start_of_turn>' + role + '\n' }}"
        r"{% if ns.system and role != 'model' %}{{ ns.system + '\n\n' }}{% set ns.system = '' %}{% endif %}"
        r"{{ (message['content'] | trim(' \t\n\v\f\r')) + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "alpaca": (
        r"{% for message in messages %}"
        r"{% if message['role'] == 'system' %}{{ message['content'] }}"
        r"{% elif message['role'] == 'user' %}{{ '\n\n### Instruction:\n\n' + message['content'] }}"
        r"{% else %}{{ '\n\n### Response:\n\n' + message['content'] }}{% endif %}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '\n\n### Response:\n\n' }}{% endif %}"),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template. `name` is the built-in name or file path; "" for the model's own."""
    source: str
    name: str = ""
    bos_token: str = ""
    eos_token: str = ""
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{self._label}: syntax error at line {exc.lineno}: {_squash(exc.message)}") \
                from None
        object.__setattr__(self, "_compiled", compiled)

    @property
    def _label(self) -> str:
        return f"chat template {self.name}" if self.name else "chat template"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (transformers' apply_chat_template(tokenize=False)).

        Raises:
            TemplateError: the template failed (raise_exception, sandbox violation, undefined value, ...).
        """
        try:
            return self._compiled.render(**self._variables(messages, add_generation_prompt))
        except Exception as exc:  # any failure inside a template is the template's: one line, no traceback
            raise TemplateError(f"{self._label}: {_error_text(exc)}") from None

    def render_parts(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Part]:
        """`render()` cut into parts: (text, True) for template text, (text, False) for message contents.

        The parts join to `render()` exactly. See `_spans` for how contents are found and the fallbacks.

        Raises:
            TemplateError: as `render`.
        """
        return _parts(self._spans(messages, add_generation_prompt))

    def delta(self, history: Sequence[Message], user: Message) -> list[Part] | None:
        """What a new user turn feeds in llama-cli's conversation mode, as parts.

        The KV cache is taken to hold `render(history[:-1])` (with the generation prompt) and then the
        reply `history[-1]` as generated, plus the end-of-generation token that ended it. The result is
        the rest of `render(history + [user])` after the reply's text: on ChatML
        "<|im_end|>\\n<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n"; remove the EOG token's
        text the model already produced with `drop_leading`. With no assistant message in `history`
        (first turn, nothing cached) it is the whole rendering.

        Returns None when the new rendering does not continue the cached text (the template rewrites
        earlier turns, e.g. drops a reply's reasoning): clear the cache and feed the whole rendering.

        Raises:
            TemplateError: as `render`.
            ValueError: `history` has replies but does not end with one.
        """
        conversation = [*history, user]
        if not any(m.get("role") == "assistant" for m in history):
            return self.render_parts(conversation)
        if history[-1].get("role") != "assistant":
            raise ValueError("delta(): history must end with the assistant's reply")
        cached = self._cached_text(history)
        spans = self._spans(conversation, True)
        if cached is None or not "".join(text for text, _ in spans).startswith(cached):
            return None
        return _parts(_slice_spans(spans, len(cached)))

    # -- internals -------------------------------------------------------------------------------------
    def _variables(self, messages: Sequence[Message], add_generation_prompt: bool) -> dict[str, Any]:
        # tools/documents are None as transformers passes them for a plain chat
        return {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt,
                "bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None}

    def _cached_text(self, history: Sequence[Message]) -> str | None:
        """The prompt the last reply was generated after, then that reply as the template renders it."""
        prompt = self.render(history[:-1], True)
        old = self.render(history, False)
        if not old.startswith(prompt):
            return None
        for candidate in _renderings(history[-1].get("content") or ""):
            if old.startswith(candidate, len(prompt)):
                return old[:len(prompt) + len(candidate)]
        return None

    def _spans(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[_Span]:
        """The rendering as spans of template text (None) and of message i's content (i).

        How: render again with each non-empty string content replaced by a marker of private-use
        characters; the text between markers is template text. Then walk the real rendering: after each
        template text comes the content, as is or as a trimming filter leaves it (checked: the next
        template text must follow); any other transformation (`| upper`, slicing) is bounded by the next
        template text instead. If the marker rendering does not line up with the real one (the template
        branches on content, a content holds our private-use characters, ...) the whole rendering is one
        span of template text: special tokens are then parsed everywhere, as llama.cpp always does.
        """
        text = self.render(messages, add_generation_prompt)
        spans = self._aligned_spans(text, messages, add_generation_prompt)
        if spans is None or "".join(t for t, _ in spans) != text:
            return [(text, None)]
        return spans

    def _aligned_spans(self, text: str, messages: Sequence[Message], add_generation_prompt: bool
                       ) -> list[_Span] | None:
        contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
        if any(_MARK_CHARS.search(c) for c in contents):
            return None
        masked = [{**m, "content": _marker(i)} if contents[i] else m for i, m in enumerate(messages)]
        try:
            skeleton = self._compiled.render(**self._variables(masked, add_generation_prompt))
        except Exception:  # the real contents rendered; markers may trip a content check
            return None
        pieces = _MARK_RE.split(skeleton)  # [template, marker digits, template, ..., template]
        literals, slots = pieces[0::2], [_marker_index(p) for p in pieces[1::2]]
        return _align(text, literals, slots, contents)


# ---------------------------------------------------------------------------------------------------
# Resolving --chat-template, the GGUF's template, and the default

def resolve(spec: str | None, gguf_template: str | bytes | None, bos_token: str = "", eos_token: str = ""
            ) -> tuple[ChatTemplate, str | None]:
    """The template to chat with, and a one-line notice for the user (or None).

    `spec` (--chat-template NAME|FILE) wins: a built-in name, else a readable file's text. Without it,
    the model's `tokenizer.chat_template`; a model without one gets chatml and the notice.

    Raises:
        TemplateError: `spec` is neither a built-in name nor a readable file; the template does not compile.
    """
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    if spec:
        if spec in BUILTIN_TEMPLATES:
            return ChatTemplate(BUILTIN_TEMPLATES[spec], spec, **tokens), None
        return ChatTemplate(_read_template_file(spec), spec, **tokens), None
    if isinstance(gguf_template, bytes):
        gguf_template = gguf_template.decode("utf-8", "replace")
    if gguf_template and gguf_template.strip():
        return ChatTemplate(gguf_template, "", **tokens), None
    return ChatTemplate(BUILTIN_TEMPLATES[DEFAULT_TEMPLATE], DEFAULT_TEMPLATE, **tokens), NO_TEMPLATE_NOTICE


def _read_template_file(spec: str) -> str:
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"--chat-template {spec}: not a file nor a built-in template "
                            f"({', '.join(BUILTIN_TEMPLATES)})")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"--chat-template {spec}: cannot read it: {one_line(exc)}") from None


# ---------------------------------------------------------------------------------------------------
# Parts: the conversation-mode helpers

def drop_leading(parts: Sequence[Part], text: str) -> list[Part]:
    """`parts` without a leading `text` of template text; unchanged if they do not start with it.

    For a delta: `text` is the end-of-generation token's text that ended the reply (already in the
    cache, e.g. "<|im_end|>"); pass nothing when the reply was cut short. Also drops a leading BOS text
    when the tokenizer adds BOS itself (llama.cpp's common_chat_templates_apply does that).
    """
    if not text or not parts or not parts[0][1] or not parts[0][0].startswith(text):
        return list(parts)
    rest = parts[0][0][len(text):]
    return ([(rest, True)] if rest else []) + list(parts[1:])


def _parts(spans: Sequence[_Span]) -> list[Part]:
    # adjacent spans of the same kind merge (two contents side by side are one run of user text)
    out: list[Part] = []
    for text, index in spans:
        if not text:
            continue
        is_template = index is None
        if out and out[-1][1] == is_template:
            out[-1] = (out[-1][0] + text, is_template)
        else:
            out.append((text, is_template))
    return out


def _slice_spans(spans: Sequence[_Span], start: int) -> list[_Span]:
    out, pos = [], 0
    for text, index in spans:
        end = pos + len(text)
        if end > start:
            out.append((text[max(0, start - pos):], index))
        pos = end
    return out


# ---------------------------------------------------------------------------------------------------
# Finding contents in a rendering

# Markers: U+F0000 digits U+F0001, digits U+F0010..U+F0019 (Supplementary Private Use Area-A).
_MARK_RE = re.compile("\U000F0000([\U000F0010-\U000F0019]+)\U000F0001")
_MARK_CHARS = re.compile("[\U000F0000-\U000F00FF]")
_C_SPACE = " \t\n\v\f\r"  # C isspace(): llama.cpp's trim()


def _marker(index: int) -> str:
    return "\U000F0000" + "".join(chr(0xF0010 + int(d)) for d in str(index)) + "\U000F0001"


def _marker_index(digits: str) -> int:
    return int("".join(str(ord(c) - 0xF0010) for c in digits))


def _renderings(content: str) -> list[str]:
    """How templates commonly render a content: as is, or trimmed (`| trim`, `.strip()`, llama.cpp trim)."""
    forms = [content, content.strip(_C_SPACE), content.strip(), content.lstrip(), content.rstrip(),
             content.lstrip(_C_SPACE), content.rstrip(_C_SPACE)]
    return list(dict.fromkeys(forms))


def _align(text: str, literals: list[str], slots: list[int], contents: list[str]) -> list[_Span] | None:
    """Split `text` as literals[0], content of slots[0], literals[1], ... or None if it does not fit."""
    if not text.startswith(literals[0]):
        return None
    spans: list[_Span] = [(literals[0], None)]
    pos = len(literals[0])
    for k, index in enumerate(slots):
        after, last = literals[k + 1], k == len(slots) - 1
        end = _content_end(text, pos, contents[index], after, last)
        if end is None:
            return None
        spans += [(text[pos:end], index), (after, None)]
        pos = end + len(after)
    return spans if pos == len(text) else None


def _content_end(text: str, pos: int, content: str, after: str, last: bool) -> int | None:
    """Where the content starting at `pos` ends: it must be followed by the template text `after`."""
    for form in _renderings(content):
        end = pos + len(form)
        if text.startswith(form, pos) and text.startswith(after, end) and (
                not last or end + len(after) == len(text)):
            return end
    if last:  # transformed some other way: bounded by the template text that follows
        end = len(text) - len(after)
        return end if end >= pos and text.endswith(after) else None
    end = text.find(after, pos)
    return end if end >= 0 else None


# ---------------------------------------------------------------------------------------------------
# The Jinja environment (transformers' _compile_jinja_template)

def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' override: plain json.dumps (jinja's own tojson escapes <, >, & and ' for HTML)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: Any) -> None:
    raise jinja2.TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _error_text(exc: Exception) -> str:
    # jinja's errors (raise_exception's among them) carry the template's message; others get their type
    if isinstance(exc, jinja2.TemplateError):
        return _squash(exc.message or type(exc).__name__)
    return one_line(exc)


def _squash(text: str | None) -> str:
    return " ".join(str(text).split())
