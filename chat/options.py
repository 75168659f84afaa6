"""Command line -> frozen `ChatOptions`: llama.cpp `main`'s flags (late 2023) plus the cluster's own.

Owns: the flag table, defaults, legal ranges, `--foo_bar` aliases and the options file (a single positional
argument naming a file whose text is parsed like the command line, with shell quoting). It reads no other
file (prompt and script files are read later, on rank 0 only) and never prints: every problem is a
`UsageError` whose str() is one line naming the option, the bad value and the legal range.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from core.cluster import env_ubatch, launch_mode
from core.errors import UsageError
from core.liveness import DEFAULT_RANK_TIMEOUT_S
from core.partition import check_weights, parse_split
from core.sampling import SamplingParams

from .demo import DEMO_SAMPLING

DEFAULT_N_CTX = 512        # -c; 0 = the model's training context
DEFAULT_N_BATCH = 512      # -b; tokens per evaluation call while consuming queued input
MAX_SEED = 2**32 - 1
SAMPLING = SamplingParams()   # the sampling defaults (llama.cpp main's), defined once in core


@dataclass(frozen=True)
class ChatOptions:
    # model and cluster
    model: str | None = None                  # -m; None = the demo model (see chat/cli.py)
    np: int | None = None                     # --np N: spawn mode with N ranks (head included)
    hostfile: str | None = None               # --hostfile F: hosts for spawned workers
    mpi_layer_split: list[float] | None = None  # --mpi-layer-split w0,w1,...: one weight per stage
    tp: int = 1                               # --tp N: N consecutive ranks form one stage (tensor parallel)
    weights: str = "native"                   # --weights native|f32 (f32: dequantized once at load; per node)
    rank_timeout: float = DEFAULT_RANK_TIMEOUT_S  # --rank-timeout S: name a rank silent this long; 0 = never
    threads: int = 1                          # -t: compute threads per rank
    n_ctx: int = DEFAULT_N_CTX                # -c
    n_batch: int = DEFAULT_N_BATCH            # -b
    rope_freq_base: float | None = None       # --rope-freq-base: None = the file's
    rope_freq_scale: float | None = None      # --rope-freq-scale (or 1 / --rope-scale): None = the file's
    # prompt and modes
    prompt: str = ""                          # -p (escapes already processed when -e)
    prompt_file: str | None = None            # -f: read on rank 0 (one trailing newline stripped)
    prompt_vars: tuple[tuple[str, str], ...] = ()  # --prompt-var NAME=VALUE fills [[NAME]]
    escape: bool = False                      # -e
    interactive: bool = False                 # -i
    interactive_first: bool = False           # --interactive-first
    instruct: bool = False                    # -ins / --instruct
    conversation: bool = False                # -cnv / --conversation: llama-cli's chat-template mode
    system_prompt: str | None = None          # -sys: the system message (-cnv)
    chat_template: str | None = None          # --chat-template NAME|FILE (-cnv): None = the model's
    reverse_prompts: tuple[str, ...] = ()     # -r (repeatable)
    input_prefix: str = ""                    # --in-prefix
    input_suffix: str = ""                    # --in-suffix
    input_prefix_bos: bool = False            # --in-prefix-bos
    multiline_input: bool = False             # --multiline-input
    n_predict: int = -1                       # -n: -1 = until EOS/stop, -2 = until the context is full
    n_keep: int = 0                           # --keep: -1 = the whole prompt
    ignore_eos: bool = False                  # --ignore-eos
    verbose_prompt: bool = False              # --verbose-prompt
    seed: int = -1                            # -s: -1 = from the clock
    # sampling (defaults: core.sampling.SamplingParams)
    logit_bias: tuple[tuple[int, float], ...] = ()  # -l ID+BIAS / ID-BIAS (repeatable)
    repeat_last_n: int = SAMPLING.repeat_last_n
    repeat_penalty: float = SAMPLING.repeat_penalty
    frequency_penalty: float = SAMPLING.frequency_penalty
    presence_penalty: float = SAMPLING.presence_penalty
    penalize_nl: bool = SAMPLING.penalize_nl
    top_k: int = SAMPLING.top_k
    tfs_z: float = SAMPLING.tfs_z
    typical_p: float = SAMPLING.typical_p
    top_p: float = SAMPLING.top_p
    min_p: float = SAMPLING.min_p
    temp: float = SAMPLING.temp
    mirostat: int = SAMPLING.mirostat
    mirostat_tau: float = SAMPLING.mirostat_tau
    mirostat_eta: float = SAMPLING.mirostat_eta
    # terminal, scripts, transcripts
    color: bool = False                       # --color (NO_COLOR in the environment wins)
    simple_io: bool = False                   # --simple-io: plain line reader even on a terminal
    script: str | None = None                 # --script FILE: replay user turns
    transcript: str | None = None             # --transcript OUT.md
    # where the options came from (chat/launch.py reads file_argv for node-local overrides)
    options_file: str | None = None
    file_argv: tuple[str, ...] = ()
    demo: bool = field(default=False)         # no -m given: the demo model and demo defaults are in use
    typed_sampling: frozenset[str] = frozenset()   # DEMO_SAMPLING's fields given as options (the demo keeps them)
    no_effect: tuple[str, ...] = ()           # llama.cpp flags accepted but meaningless here, as typed

    @property
    def is_interactive(self) -> bool:
        """-i, --interactive-first, -ins, -cnv and --script all make the session interactive (as in main)."""
        return (self.interactive or self.interactive_first or self.instruct or self.conversation
                or self.script is not None)

    def transcript_settings(self, model_label: str, n_ctx: int) -> list[tuple[str, str]]:
        """The settings that decide the tokens (no rank count, no resolved clock seed)."""
        rows = [("model", model_label), ("n_ctx", str(n_ctx)), ("n_predict", str(self.n_predict)),
                ("n_keep", str(self.n_keep)), ("n_batch", str(self.n_batch))]
        modes = [name for name, on in (("interactive", self.interactive), ("interactive-first", self.interactive_first),
                                       ("instruct", self.instruct), ("multiline-input", self.multiline_input),
                                       ("escape", self.escape), ("ignore-eos", self.ignore_eos),
                                       ("in-prefix-bos", self.input_prefix_bos),
                                       ("script", self.script is not None)) if on]
        rows.append(("modes", ", ".join(modes) or "none"))
        if self.prompt_file:
            rows.append(("prompt file", self.prompt_file))
        elif self.prompt:
            rows.append(("prompt", repr(self.prompt if len(self.prompt) <= 200 else self.prompt[:200] + "...")))
        for rp in self.reverse_prompts:
            rows.append(("reverse prompt", repr(rp)))
        if self.input_prefix:
            rows.append(("input prefix", repr(self.input_prefix)))
        if self.input_suffix:
            rows.append(("input suffix", repr(self.input_suffix)))
        rows.append(("sampling", f"temp {self.temp}, top_k {self.top_k}, top_p {self.top_p}, min_p {self.min_p}, "
                                 f"tfs {self.tfs_z}, typical {self.typical_p}, repeat_penalty {self.repeat_penalty} "
                                 f"over {self.repeat_last_n}, frequency {self.frequency_penalty}, "
                                 f"presence {self.presence_penalty}, mirostat {self.mirostat} "
                                 f"(tau {self.mirostat_tau}, eta {self.mirostat_eta})"))
        rows.append(("seed", str(self.seed) if self.seed >= 0 else "from the clock (see Run)"))
        return rows

    def loop_settings(self, reverse_prompts: tuple[str, ...] | None = None, input_prefix: str | None = None,
                      input_suffix: str | None = None) -> LoopSettings:
        """What llama.cpp main's loop (chat/state.py) needs; -r/--in-prefix/--in-suffix given with their
        --prompt-var placeholders filled (None: as typed)."""
        return LoopSettings(
            n_predict=self.n_predict, n_batch=self.n_batch, n_keep=self.n_keep, interactive=self.is_interactive,
            interactive_first=self.interactive_first, instruct=self.instruct,
            reverse_prompts=self.reverse_prompts if reverse_prompts is None else reverse_prompts,
            input_prefix=self.input_prefix if input_prefix is None else input_prefix,
            input_suffix=self.input_suffix if input_suffix is None else input_suffix,
            input_prefix_bos=self.input_prefix_bos, escape=self.escape)

    def session_settings(self) -> SessionSettings:
        """What the driver on rank 0 (chat/session.py) needs."""
        return SessionSettings(SamplingParams.from_namespace(self), self.seed, self.ignore_eos, self.transcript)

    def conversation_settings(self, first_user: str, stop: tuple[str, ...]) -> ConversationSettings:
        """-cnv's settings: -p's text (placeholders filled) is the first user message, -r ends a reply."""
        return ConversationSettings(n_predict=self.n_predict, system=self.system_prompt, first_user=first_user,
                                    stop=stop)

    def reader_settings(self) -> ReaderSettings:
        return ReaderSettings(self.multiline_input, self.simple_io, spawn=(self.np or 0) > 1)


@dataclass(frozen=True)
class LoopSettings:
    """llama.cpp main's loop settings (chat/state.py)."""
    n_predict: int = -1                       # -n
    n_batch: int = DEFAULT_N_BATCH            # -b
    n_keep: int = 0                           # --keep
    interactive: bool = False                 # -i, --interactive-first, -ins or --script
    interactive_first: bool = False
    instruct: bool = False
    reverse_prompts: tuple[str, ...] = ()
    input_prefix: str = ""
    input_suffix: str = ""
    input_prefix_bos: bool = False
    escape: bool = False                      # -e: process escapes in user input


@dataclass(frozen=True)
class ConversationSettings:
    """llama-cli's conversation mode (chat/conversation.py)."""
    n_predict: int = -1                # -n: tokens one reply may take (-1: until end of generation)
    system: str | None = None          # -sys: the system message (None: whatever the template does)
    first_user: str = ""               # -p: the first user message ("" : wait for the user)
    stop: tuple[str, ...] = ()         # -r: a reply also ends at these strings


@dataclass(frozen=True)
class SessionSettings:
    """The driver's settings (chat/session.py): sampling, seed, --ignore-eos, --transcript."""
    sampling: SamplingParams
    seed: int = -1                            # -1 = from the clock
    ignore_eos: bool = False
    transcript: str | None = None


@dataclass(frozen=True)
class ReaderSettings:
    """How rank 0 reads user turns (chat/repl.py)."""
    multiline_input: bool = False
    simple_io: bool = False
    spawn: bool = False                       # spawn mode: the head keeps the terminal while workers start


# ---------------------------------------------------------------------------------------------------
# value checkers: each returns the converted value or raises UsageError naming the option and the range

def _int(opt: str, lo: int | None = None, hi: int | None = None, legal: str = ""):
    def conv(text: str) -> int:
        try:
            value = int(text, 0) if text.strip().lower().startswith(("0x", "-0x")) else int(text)
        except ValueError:
            raise UsageError(f"{opt}: '{text}' is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = legal or _range_text(lo, hi)
            raise UsageError(f"{opt} {value} is out of range: {rng}")
        return value
    return conv


def _float(opt: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False, legal: str = ""):
    def conv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{opt}: '{text}' is not a number") from None
        bad = math.isnan(value) or math.isinf(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and value > hi)
        if bad:
            rng = legal or _range_text(lo, hi, lo_open)
            raise UsageError(f"{opt} {text} is out of range: {rng}")
        return value
    return conv


def _range_text(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"must be in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"must be {'>' if lo_open else '>='} {lo}"
    return f"must be <= {hi}"


def _logit_bias(text: str) -> tuple[int, float]:
    """`ID+BIAS` or `ID-BIAS` (llama.cpp's -l syntax; `-inf` bans a token)."""
    for i, ch in enumerate(text):
        if ch in "+-" and i > 0:
            try:
                token = int(text[:i])
                bias = float(text[i + 1:])
            except ValueError:
                break
            if math.isnan(bias):
                break
            return token, (-bias if ch == "-" else bias)
    raise UsageError(f"-l/--logit-bias: '{text}' is not TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 2-inf)")


def _layer_split(text: str) -> list[float]:
    weights = parse_split(text)
    return check_weights(weights, len(weights))          # the rank count is checked once it is known


def _prompt_var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not name.replace("_", "").isalnum():
        raise UsageError(f"--prompt-var: '{text}' is not NAME=VALUE (NAME: letters, digits, _)")
    return name, value


# ---------------------------------------------------------------------------------------------------
# llama.cpp main flags that mean nothing here: accepted, so that an options file written for llama.cpp's
# MPI example keeps working, and named once by the head (chat/cli.py) with the reason

_GPU = "llama-mpi computes on CPUs with numpy; there is no GPU offload"
NO_EFFECT: dict[tuple[str, ...], tuple[bool, str]] = {      # flags -> (takes a value, why it does nothing)
    ("-ngl", "--n-gpu-layers", "--gpu-layers"): (True, _GPU),
    ("-mg", "--main-gpu"): (True, _GPU),
    ("-ts", "--tensor-split"): (True, _GPU),
    ("-nommq", "--no-mul-mat-q"): (False, _GPU),
    ("--low-vram",): (False, _GPU),
    ("--mlock",): (False, "every rank maps its own layers and repacks them into its memory"),
    ("--no-mmap",): (False, "every rank maps its own layers and repacks them into its memory"),
    ("--numa",): (False, "there is no NUMA placement; use one rank per socket instead"),
    ("-tb", "--threads-batch"): (True, "-t threads serve both prompt and generation"),
    ("--memory-f32",): (False, "the KV cache is always float32"),
}


def no_effect_reason(typed: str) -> str:
    """Why a flag recorded in ChatOptions.no_effect ("-ngl 99") changes nothing."""
    flag = typed.split()[0]
    return next(why for flags, (_, why) in NO_EFFECT.items() if flag in flags)


class _NoEffect(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        ns.no_effect = [*ns.no_effect, option_string if values in (None, []) else f"{option_string} {values}"]


# ---------------------------------------------------------------------------------------------------
# the flag table

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (missing value, bad choice): one line
        raise UsageError(message)


def _build_parser() -> _Parser:
    p = _Parser(prog="llama-mpi", allow_abbrev=False, add_help=True,
                description="Chat with a LLaMA-family GGUF model split by layers across an MPI cluster.",
                epilog="A single positional FILE is an options file: its text is parsed like the command "
                       "line (shell quoting, # comments); options given on the command line win.")
    a = p.add_argument
    g = p.add_argument_group("model and cluster")
    g.add_argument("-m", "--model", metavar="FILE", help="GGUF model (default: the demo model)")
    g.add_argument("--np", type=_int("--np", 1), metavar="N", help="spawn mode: run on N ranks (head included)")
    g.add_argument("--hostfile", metavar="FILE", help="hosts for spawned workers (see hostsfile.example)")
    g.add_argument("--tp", type=_int("--tp", 1), default=1, metavar="N",
                   help="tensor parallelism: every N consecutive ranks split each layer of one pipeline stage "
                        "(ranks: a multiple of N; needs mpiexec or --np)")
    g.add_argument("--weights", choices=("native", "f32"), default="native",
                   help="f32: dequantize this node's matrices once at load and multiply with BLAS "
                        "(~2x faster per token, 4-8x the memory of a quantized file)")
    g.add_argument("--rank-timeout", type=_float("--rank-timeout", 0.0), default=DEFAULT_RANK_TIMEOUT_S,
                   metavar="S", help="end the job, naming the rank, when a rank gives no sign of life for S "
                                     f"seconds (default {DEFAULT_RANK_TIMEOUT_S:g}; 0 = wait forever)")
    g.add_argument("--mpi-layer-split", type=_layer_split, metavar="W0,W1,..",
                   help="relative share of layers per rank, head first (default: equal)")
    g.add_argument("-t", "--threads", type=_int("-t/--threads", 1), default=1, metavar="N")
    g.add_argument("-c", "--ctx-size", dest="n_ctx", type=_int("-c/--ctx-size", 0), default=DEFAULT_N_CTX,
                   metavar="N", help="context size (default 512, 0 = the model's)")
    g.add_argument("-b", "--batch-size", dest="n_batch", type=_int("-b/--batch-size", 1),
                   default=DEFAULT_N_BATCH, metavar="N")
    g.add_argument("--rope-freq-base", type=_float("--rope-freq-base", 0.0, lo_open=True), metavar="F",
                   help="RoPE base frequency (default: the model's)")
    g.add_argument("--rope-freq-scale", type=_float("--rope-freq-scale", 0.0, lo_open=True), metavar="F",
                   help="RoPE linear scaling: positions times F (default: the model's)")
    g.add_argument("--rope-scale", type=_float("--rope-scale", 0.0, lo_open=True), metavar="F",
                   help="the same as --rope-freq-scale 1/F")

    g = p.add_argument_group("prompt and modes")
    g.add_argument("-p", "--prompt", metavar="TEXT")
    g.add_argument("-f", "--file", dest="prompt_file", metavar="FILE", help="read the prompt from FILE")
    g.add_argument("--prompt-var", dest="prompt_vars", action="append", type=_prompt_var, default=[],
                   metavar="NAME=VALUE", help="fill [[NAME]] in the prompt, -r, --in-prefix/--in-suffix")
    g.add_argument("-e", "--escape", action="store_true", help="process \\n, \\t, \\xNN ... in prompts and input")
    g.add_argument("-i", "--interactive", action="store_true")
    g.add_argument("--interactive-first", action="store_true", help="wait for input before generating")
    g.add_argument("-ins", "--instruct", action="store_true", help="Alpaca instruction mode")
    g.add_argument("-cnv", "--conversation", action="store_true",
                   help="chat with the model's chat template (-p: the first user message)")
    g.add_argument("-sys", "--system-prompt", metavar="TEXT", help="-cnv: the system message")
    g.add_argument("--chat-template", metavar="NAME|FILE",
                   help="-cnv: chatml, llama2, llama3, alpaca, ... or a Jinja file (default: the model's)")
    g.add_argument("-r", "--reverse-prompt", dest="reverse_prompts", action="append", default=[],
                   metavar="TEXT", help="hand control back when TEXT is generated (repeatable)")
    g.add_argument("--in-prefix", dest="input_prefix", default="", metavar="TEXT")
    g.add_argument("--in-suffix", dest="input_suffix", default="", metavar="TEXT")
    g.add_argument("--in-prefix-bos", dest="input_prefix_bos", action="store_true")
    g.add_argument("--multiline-input", action="store_true", help="Enter continues, a final \\ submits")
    g.add_argument("-n", "--n-predict", dest="n_predict", type=_int("-n/--n-predict", -2), default=-1,
                   metavar="N", help="tokens to predict (-1 = until EOS, -2 = until the context is full)")
    g.add_argument("--keep", dest="n_keep", type=_int("--keep", -1), default=0, metavar="N",
                   help="prompt tokens kept when the context shifts (-1 = all)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--verbose-prompt", action="store_true")
    g.add_argument("-s", "--seed", type=_int("-s/--seed", -1, MAX_SEED), default=-1, metavar="N")

    g = p.add_argument_group("sampling (applied in this order)")
    g.add_argument("-l", "--logit-bias", dest="logit_bias", action="append", type=_logit_bias, default=[],
                   metavar="ID(+|-)BIAS")
    g.add_argument("--repeat-last-n", type=_int("--repeat-last-n", -1),
                   default=SAMPLING.repeat_last_n, metavar="N",
                   help="(-1 = the context size, 0 = off)")
    g.add_argument("--repeat-penalty", type=_float("--repeat-penalty", 0.0, lo_open=True),
                   default=SAMPLING.repeat_penalty)
    g.add_argument("--frequency-penalty", type=_float("--frequency-penalty", -2.0, 2.0),
                   default=SAMPLING.frequency_penalty)
    g.add_argument("--presence-penalty", type=_float("--presence-penalty", -2.0, 2.0),
                   default=SAMPLING.presence_penalty)
    g.add_argument("--no-penalize-nl", dest="penalize_nl", action="store_false")
    g.add_argument("--top-k", type=_int("--top-k", 0), default=SAMPLING.top_k, metavar="N", help="(0 = off)")
    g.add_argument("--tfs", dest="tfs_z", type=_float("--tfs", 0.0, 1.0, lo_open=True), default=SAMPLING.tfs_z)
    g.add_argument("--typical", dest="typical_p", type=_float("--typical", 0.0, 1.0, lo_open=True),
                   default=SAMPLING.typical_p)
    g.add_argument("--top-p", type=_float("--top-p", 0.0, 1.0), default=None, help=f"(default {SAMPLING.top_p})")
    g.add_argument("--min-p", type=_float("--min-p", 0.0, 1.0), default=SAMPLING.min_p)
    g.add_argument("--temp", type=_float("--temp", 0.0), default=None, help=f"(default {SAMPLING.temp}; 0 = greedy)")
    g.add_argument("--mirostat", type=_int("--mirostat", 0, 2, legal="must be 0 (off), 1 or 2"),
                   default=SAMPLING.mirostat)
    g.add_argument("--mirostat-lr", dest="mirostat_eta", type=_float("--mirostat-lr", 0.0, lo_open=True),
                   default=SAMPLING.mirostat_eta)
    g.add_argument("--mirostat-ent", dest="mirostat_tau", type=_float("--mirostat-ent", 0.0),
                   default=SAMPLING.mirostat_tau)

    g = p.add_argument_group("terminal, scripts and transcripts")
    g.add_argument("--color", action="store_true", help="colour prompt, input and errors (NO_COLOR wins)")
    g.add_argument("--simple-io", action="store_true", help="plain line input even on a terminal")
    g.add_argument("--script", metavar="FILE", help="replay user turns from FILE (blank line between turns)")
    g.add_argument("--transcript", metavar="OUT.md", help="write the conversation to OUT.md at exit")
    g = p.add_argument_group("accepted from llama.cpp's main, with no effect here (the head says why)",
                             ", ".join(flags[0] for flags in NO_EFFECT))
    for flags, (takes_value, _) in NO_EFFECT.items():
        g.add_argument(*flags, action=_NoEffect, nargs=None if takes_value else 0, dest="no_effect",
                       default=[], help=argparse.SUPPRESS)
    a("options_file", nargs="?", metavar="FILE", help="options file (command-line syntax)")
    return p


_PARSER = _build_parser()
_LONG_FLAGS = frozenset(s for act in _PARSER._actions for s in act.option_strings if s.startswith("--"))


def _normalise(argv: list[str]) -> list[str]:
    """Accept `--foo_bar` for `--foo-bar` (also in `--foo_bar=value`), as llama.cpp does."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg:
            name, eq, value = arg.partition("=")
            alias = name.replace("_", "-")
            if alias in _LONG_FLAGS:
                arg = alias + eq + value
        out.append(arg)
    return out


_SHORT_WORDS = frozenset(s for act in _PARSER._actions for s in act.option_strings
                         if not s.startswith("--") and len(s) > 2)


def _parse(argv: list[str]) -> argparse.Namespace:
    for arg in argv:             # "-np 2" would otherwise be read as "-n p" and fail on the value
        word = arg.split("=")[0]
        if len(word) > 2 and word[0] == "-" and word[1:].isalpha() and word not in _SHORT_WORDS:
            raise UsageError(f"unknown option {word} (see --help)")
    ns, rest = _PARSER.parse_known_args(argv)
    for arg in rest:
        if arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg.split('=')[0]} (see --help)")
        raise UsageError(f"unexpected argument '{arg}' (only one options file may be given)")
    return ns


def read_user_file(path: str, label: str) -> bytes:
    """The bytes of a file the user named; `label` says which (e.g. "--script: file"), as errors do.

    Raises:
        UsageError: "<label> '<path>' not found" or "... cannot be read: <reason>".
    """
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{label} '{path}' not found") from None
    except OSError as exc:
        raise UsageError(f"{label} '{path}' cannot be read: {exc.strerror or exc}") from None


def read_options_file(path: str) -> list[str]:
    """The options file's arguments, split like a shell command line (comments allowed)."""
    try:
        text = read_user_file(path, "options file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"options file '{path}' cannot be read: {exc}") from None
    try:
        return shlex.split(text, comments=True)
    except ValueError as exc:
        raise UsageError(f"options file '{path}': {exc}") from None


def process_escapes(text: str) -> str:
    r"""llama.cpp's process_escapes: \n \r \t \' \" \\ and \xNN (a byte); other backslashes stay.

    Works on the UTF-8 bytes like the C++ original, so `\xe2\x96\x81` becomes one character.
    """
    raw = text.encode("utf-8")
    simple = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"',
              ord("\\"): b"\\"}
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == ord("\\") and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt in simple:
                out += simple[nxt]
                i += 2
                continue
            hex_digits = raw[i + 2:i + 4]
            if nxt == ord("x") and len(hex_digits) == 2 and all(c in b"0123456789abcdefABCDEF" for c in hex_digits):
                out.append(int(hex_digits, 16))
                i += 4
                continue
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", errors="replace")


def parse_options(argv: list[str]) -> ChatOptions:
    """argv (without the program name) -> ChatOptions.

    Raises:
        UsageError: unknown option, bad or out-of-range value, unreadable options file, conflicting flags.
    """
    argv = _normalise(list(argv))
    ns = _parse(argv)
    file_argv: list[str] = []
    if ns.options_file is not None:
        file_argv = _normalise(read_options_file(ns.options_file))
        file_ns = _parse(file_argv)
        if file_ns.options_file is not None:
            raise UsageError(f"options file '{ns.options_file}' names another options file "
                             f"'{file_ns.options_file}'")
        path = ns.options_file
        ns = _parse(file_argv + [a for a in argv if a != path])
        ns.options_file = path
    check_environment()
    opts = _to_options(ns, tuple(file_argv))
    mode = launch_mode(opts.np)        # --np under mpiexec: raised here, where rank 0 alone reports it
    if opts.hostfile is not None and mode != "spawn":
        raise UsageError("--hostfile places the workers --np N spawns: "
                         + ("under mpiexec give the hostfile to mpiexec (-f FILE)" if mode == "mpiexec"
                            else "without workers to place it would do nothing (add --np N)"))
    return opts


def check_environment() -> None:
    """The engine's settings read from the environment, checked with the options (under mpiexec every rank
    reads the same ones, so rank 0 alone reports them): LLAMA_MPI_UBATCH and LLAMA_MPI_ALLREDUCE."""
    from core.transport import allreduce_method    # importing does not start MPI
    env_ubatch()
    allreduce_method()


def command_line_is_valid(argv: list[str]) -> bool:
    """Does argv parse, leaving aside the options file's contents? (a worker rank's error triage)"""
    try:
        path = _parse(_normalise(list(argv))).options_file
        parse_options([a for a in argv if path is None or a != path])
        return True
    except UsageError:
        return False


def _to_options(ns: argparse.Namespace, file_argv: tuple[str, ...]) -> ChatOptions:
    if ns.prompt is not None and ns.prompt_file is not None:
        raise UsageError("-p/--prompt and -f/--file both given: use one")
    values = {f.name: getattr(ns, f.name) for f in fields(ChatOptions) if hasattr(ns, f.name)}
    values["prompt"] = ns.prompt or ""
    values["reverse_prompts"] = tuple(ns.reverse_prompts)
    values["prompt_vars"] = tuple(ns.prompt_vars)
    values["logit_bias"] = tuple(ns.logit_bias)
    values["file_argv"] = file_argv
    values["no_effect"] = tuple(ns.no_effect)
    if ns.rope_scale is not None:
        if ns.rope_freq_scale is not None:
            raise UsageError("--rope-scale and --rope-freq-scale both given: use one")
        values["rope_freq_scale"] = 1.0 / ns.rope_scale
    values["demo"] = ns.model is None
    values["typed_sampling"] = frozenset(name for name, _ in DEMO_SAMPLING if values[name] is not None)
    for name, _ in DEMO_SAMPLING:                   # parsed with None as default, to know what was typed
        if values[name] is None:
            values[name] = getattr(SAMPLING, name)
    opts = ChatOptions(**values)
    if opts.escape:
        opts = replace(opts, prompt=process_escapes(opts.prompt),
                       input_prefix=process_escapes(opts.input_prefix),
                       input_suffix=process_escapes(opts.input_suffix),
                       reverse_prompts=tuple(process_escapes(r) for r in opts.reverse_prompts))
    if opts.conversation:
        clash = [flag for flag, on in (("-ins", opts.instruct), ("--in-prefix", opts.input_prefix),
                                       ("--in-suffix", opts.input_suffix), ("--in-prefix-bos", opts.input_prefix_bos))
                 if on]
        if clash:
            raise UsageError(f"-cnv/--conversation: {clash[0]} has no meaning in conversation mode "
                             "(the chat template wraps each turn)")
    elif opts.system_prompt is not None or opts.chat_template is not None:
        flag = "-sys/--system-prompt" if opts.system_prompt is not None else "--chat-template"
        raise UsageError(f"{flag} needs conversation mode: add -cnv")
    if opts.np is not None and opts.np % opts.tp:
        raise UsageError(f"--tp {opts.tp}: --np {opts.np} is not a multiple of {opts.tp} "
                         f"(ranks form groups of {opts.tp}, one group per pipeline stage)")
    if opts.mpi_layer_split is not None and opts.np is not None and len(opts.mpi_layer_split) != opts.np // opts.tp:
        n = len(opts.mpi_layer_split)
        weights = f"{n} weight{'s' if n != 1 else ''}"
        if opts.tp == 1:
            raise UsageError(f"--mpi-layer-split has {weights} but --np is {opts.np}: give one weight per rank")
        stages = opts.np // opts.tp
        raise UsageError(f"--mpi-layer-split has {weights} but --np {opts.np} with "
                         f"--tp {opts.tp} makes {stages} stage{'s' if stages != 1 else ''}: give one weight per stage")
    return opts


def fill_prompt_vars(text: str, prompt_vars: tuple[tuple[str, str], ...], what: str) -> str:
    """Replace `[[NAME]]` by its --prompt-var value; a placeholder left without a value is an error."""
    for name, value in prompt_vars:
        text = text.replace(f"[[{name}]]", value)
    start = text.find("[[")
    if start >= 0 and "]]" in text[start:]:
        name = text[start + 2:text.index("]]", start)]
        if name and name.replace("_", "").isalnum():
            raise UsageError(f"{what}: placeholder [[{name}]] has no value; pass --prompt-var {name}=...")
    return text


def help_text() -> str:
    return _PARSER.format_help()


def env_no_color() -> bool:
    """NO_COLOR set to anything non-empty disables colour (https://no-color.org)."""
    return bool(os.environ.get("NO_COLOR"))
