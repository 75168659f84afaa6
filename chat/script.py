"""--script replay files and --transcript / /save Markdown transcripts.

Owns reading a script (bytes -> turns, invalid UTF-8 a one-line error) and recording a conversation
(settings, the verbatim stream, user turns with the model's replies, run facts and timings) to Markdown.
Everything above the `## Run` heading depends only on the settings and the tokens, never on the rank
count or the clock, so two runs that generated the same tokens write the same text there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UsageError

from .lines import ScriptTurn, decode_script, split_script
from .options import ChatOptions, read_user_file

RUN_HEADING = "## Run"


def load_script(path: str) -> list[ScriptTurn]:
    """The turns of a --script file.

    Raises:
        UsageError: missing/unreadable file or invalid UTF-8 (names the file and line).
    """
    return split_script(decode_script(read_user_file(path, "--script: file"), path))


@dataclass
class Transcript:
    """Everything shown in the conversation stream, plus the user turns, for a Markdown file."""
    settings: list[tuple[str, str]] = field(default_factory=list)
    stream: list[str] = field(default_factory=list)        # the conversation as shown, verbatim
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, model reply so far)
    run: list[tuple[str, str]] = field(default_factory=list)
    timings: str = ""

    def add(self, text: str) -> None:
        self.stream.append(text)
        if self.turns:
            user, reply = self.turns[-1]
            self.turns[-1] = (user, reply + text)

    def user(self, text: str) -> None:
        self.stream.append(text)
        self.turns.append((text, ""))

    def markdown(self) -> str:
        conversation = "".join(self.stream)
        fence = _fence(conversation)
        out = ["# llama-mpi transcript", "", "## Settings", ""]
        out += [f"- {k}: {_inline(v)}" for k, v in self.settings]
        out += ["", "## Conversation", "", fence + "text", conversation.rstrip("\n"), fence, ""]
        if self.turns:
            out += ["## Turns", ""]
            for i, (user, reply) in enumerate(self.turns, start=1):
                f = _fence(user + reply)
                out += [f"### Turn {i}", "", "User:", "", f + "text", user.rstrip("\n"), f, "",
                        "Model:", "", f + "text", reply.strip("\n"), f, ""]
        out += [RUN_HEADING, ""]
        out += [f"- {k}: {_inline(v)}" for k, v in self.run]
        if self.timings:
            out += ["", "```text", self.timings, "```"]
        return "\n".join(out) + "\n"

    def save(self, path: str) -> None:
        try:
            Path(path).write_text(self.markdown(), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write transcript '{path}': {exc.strerror}") from None


def settings_of(opts: ChatOptions, model_label: str, n_ctx: int) -> list[tuple[str, str]]:
    """The settings that decide the tokens (no rank count, no resolved clock seed)."""
    rows = [("model", model_label), ("n_ctx", str(n_ctx)), ("n_predict", str(opts.n_predict)),
            ("n_keep", str(opts.n_keep)), ("n_batch", str(opts.n_batch))]
    modes = [name for name, on in (("interactive", opts.interactive), ("interactive-first", opts.interactive_first),
                                   ("instruct", opts.instruct), ("multiline-input", opts.multiline_input),
                                   ("escape", opts.escape), ("ignore-eos", opts.ignore_eos),
                                   ("in-prefix-bos", opts.input_prefix_bos),
                                   ("script", opts.script is not None)) if on]
    rows.append(("modes", ", ".join(modes) or "none"))
    if opts.prompt_file:
        rows.append(("prompt file", opts.prompt_file))
    elif opts.prompt:
        rows.append(("prompt", repr(opts.prompt if len(opts.prompt) <= 200 else opts.prompt[:200] + "...")))
    for rp in opts.reverse_prompts:
        rows.append(("reverse prompt", repr(rp)))
    if opts.input_prefix:
        rows.append(("input prefix", repr(opts.input_prefix)))
    if opts.input_suffix:
        rows.append(("input suffix", repr(opts.input_suffix)))
    rows.append(("sampling", f"temp {opts.temp}, top_k {opts.top_k}, top_p {opts.top_p}, min_p {opts.min_p}, "
                             f"tfs {opts.tfs_z}, typical {opts.typical_p}, repeat_penalty {opts.repeat_penalty} "
                             f"over {opts.repeat_last_n}, frequency {opts.frequency_penalty}, "
                             f"presence {opts.presence_penalty}, mirostat {opts.mirostat} "
                             f"(tau {opts.mirostat_tau}, eta {opts.mirostat_eta})"))
    rows.append(("seed", str(opts.seed) if opts.seed >= 0 else "from the clock (see Run)"))
    return rows


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks inside the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _inline(value: str) -> str:
    return value.replace("\n", "\\n")
