"""The driver on rank 0: answers ChatState's requests with the pipeline, the sampler and a reader.

Owns the conversation's run time: Ctrl-C (first press: stop at the next token and prompt; at the prompt
or a second press: timings, exit 130), end of input (exit 0), slash commands, timings, the transcript
and the toolbar numbers. Every evaluation and KV-cache change goes through `pipeline` (so every rank
replays it); nothing here touches MPI directly, reads a terminal directly or chooses colours.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from core.errors import LlamaMpiError
from core.chat_template import ChatTemplate
from core.partition import format_layers
from core.generate import Evaluated, GenerateSettings, Shifted, Stopped, Token, generate
from core.sampling import Sampler

from .commands import Command, help_text, parse_command
from .conversation import ClearCache, ConversationSettings, ConversationState, Generate
from .interrupts import EXIT_INTERRUPTED, ChatCtrlC
from .options import LoopSettings, SessionSettings
from .render import Renderer, stats_table, timings_text, toolbar_text
from .script import Transcript
from .state import (Accept, ChatState, Done, Eval, Print, Read, ResetHistory, Sample, Shift, Show,
                    UserTurn)


class Reader(Protocol):
    def read_turn(self, session: "ChatSession", instruct: bool) -> str | None: ...


class _Quit(Exception):
    def __init__(self, code: int):
        self.code = code


class _Restart(Exception):
    pass


def make_sampler(settings: SessionSettings, tokenizer, n_vocab: int, n_ctx: int) -> tuple[Sampler, int]:
    """The sampler of the settings (seed -1 resolved from the clock); --ignore-eos bans the end tokens."""
    params = settings.sampling
    if settings.ignore_eos:
        for eog in sorted(tokenizer.eog_ids):
            params = params.with_logit_bias(int(eog), float("-inf"))
    seed = settings.seed if settings.seed >= 0 else int(time.time()) & 0xFFFFFFFF
    return Sampler(params, n_vocab, seed, nl_id=tokenizer.nl_id, n_ctx=n_ctx), seed


@dataclass
class Timings:
    load_ms: float = 0.0
    sample_ms: float = 0.0
    n_sample: int = 0
    prompt_ms: float = 0.0
    n_prompt_eval: int = 0
    eval_ms: float = 0.0
    n_eval: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    turn_tokens: int = 0            # generated this turn (toolbar speed)
    turn_ms: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["total_ms"] = 1000.0 * (time.perf_counter() - self.t_start) + self.load_ms
        return d


class ChatSession:
    """One chat on rank 0 (restarted by /reset).

    Args:
        settings: sampling, seed, --ignore-eos, --transcript; loop: main's loop settings (placeholders
            filled); prompt: the final initial prompt text.
        pipeline: core.pipeline Pipeline (local or MPI head); tokenizer: core.tokenizer Tokenizer.
        ui: Renderer; reader: where user turns come from (None: non-interactive).
        transcript: recorder for --transcript and /save.
        conversation: -cnv's settings and chat template (None: llama.cpp main's loop).
    """

    def __init__(self, settings: SessionSettings, loop: LoopSettings, pipeline, tokenizer, ui: Renderer,
                 reader: Reader | None, *, prompt: str, transcript: Transcript | None = None,
                 load_ms: float = 0.0, ctrl_c: ChatCtrlC | None = None,
                 conversation: tuple[ConversationSettings, ChatTemplate] | None = None):
        self.settings = settings
        self.loop = loop
        self.conversation = conversation          # -cnv: the chat template drives the turns
        self.pipeline = pipeline
        self.tok = tokenizer
        self.ui = ui
        self.reader = reader
        self.ctrl_c = ctrl_c or ChatCtrlC(None)   # presses from SIGINT or, on a terminal, read as a byte
        # what a reader calls while it waits for input: a cluster's failure poll (a worker that dies
        # meanwhile is reported at once, as one PipelineError); None in one process (nothing to watch)
        self.peer_watch = pipeline.poll_failure if pipeline.size > 1 else None
        self.prompt = prompt
        self.transcript = transcript or Transcript()
        self.n_ctx = int(pipeline.n_ctx)
        self.n_vocab = int(pipeline.config.n_vocab)
        self.sampler, self.seed = make_sampler(settings, tokenizer, self.n_vocab, self.n_ctx)
        self.timings = Timings(load_ms=load_ms)
        self.state = self._new_state()           # raises ContextOverflowError before anything runs
        self.pieces = tokenizer.stream_decoder(strip_leading_space=False)
        self.logits: np.ndarray | None = None
        self.rank_ms: list[float] = []

    def _new_state(self, restart: bool = False) -> ChatState | ConversationState:
        if self.conversation is not None:       # /reset: the conversation starts empty (system kept)
            settings, template = self.conversation
            return ConversationState(replace(settings, first_user="") if restart else settings, template,
                                     self.tok, self.n_ctx)
        return ChatState(self.loop, self.tok, self.n_ctx, self.prompt)

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until end of input, /quit, Ctrl-C at the prompt or the end of generation; the exit code."""
        with self.ctrl_c:
            try:
                return self._run_restarting()
            except _Quit as q:
                self.finish(interrupted=q.code == EXIT_INTERRUPTED)
                return q.code

    def _run_restarting(self) -> int:
        while True:
            try:
                return self._run_state()
            except _Restart:
                self.pipeline.kv_clear()
                self.sampler.reset()
                self.state = self._new_state(restart=True)
                self.ui.newline_if_needed()
                self.ui.info("context cleared on every rank; " + ("the conversation starts again"
                             if self.conversation else "starting again from the initial prompt"))

    def _run_state(self) -> int:
        gen = self.state.run()
        reply = None
        while True:
            req = gen.send(reply)
            reply = None
            if isinstance(req, Eval):
                self._eval(req.tokens, req.sampled)
                if self._stop_asked(self.state.interactive):
                    self.state.interrupt()
            elif isinstance(req, Sample):
                t0 = time.perf_counter()
                reply = self.sampler.sample(self.logits)
                self.timings.sample_ms += 1000.0 * (time.perf_counter() - t0)
                self.timings.n_sample += 1
            elif isinstance(req, Accept):
                for t in req.tokens:
                    self.sampler.accept(t)
            elif isinstance(req, ResetHistory):
                self.sampler.reset()
            elif isinstance(req, Show):
                self._emit("".join(self.pieces.add(t) for t in req.tokens), req.style)
            elif isinstance(req, Print):
                self._emit(self.pieces.flush(), "output")
                self._emit(req.text, req.style)
            elif isinstance(req, Shift):
                self.pipeline.kv_shift(req.n_keep, req.n_discard)
            elif isinstance(req, Read):
                self._emit(self.pieces.flush(), "output")
                reply = self._read(req.instruct)
            elif isinstance(req, UserTurn):
                if req.echo:
                    self.ui.user_echo(req.text)
                self.transcript.user(req.text)
            elif isinstance(req, Generate):
                reply = self._generate(req)
            elif isinstance(req, ClearCache):
                self.pipeline.kv_clear()
            elif isinstance(req, Done):
                self._emit(self.pieces.flush(), "output")
                self.finish(interrupted=False)
                return 0

    def _generate(self, req: Generate) -> tuple[tuple[int, ...], str]:
        """A conversation turn: feed the turn's tokens, then stream one reply (core.generate) until an
        end-of-generation token, -n, a stop string or Ctrl-C. Returns (reply ids, why it ended)."""
        settings = GenerateSettings(n_predict=req.n_predict, n_batch=self.loop.n_batch, n_keep=req.n_keep,
                                    eog=frozenset(self.tok.eog_ids), stop=req.stop)
        piece = lambda t: self.tok.token_to_piece(t, special=False)       # noqa: E731
        events = generate(self.pipeline, self.sampler, req.tokens, settings, piece)
        reply: list[int] = []
        try:
            for event in events:
                if isinstance(event, Evaluated):
                    self._count_eval(event.n_tokens, event.ms, event.sampled)
                    if self._stop_asked(interactive=True):
                        return tuple(reply), "interrupted"
                elif isinstance(event, Token):
                    reply.append(event.id)
                    self.timings.sample_ms += event.ms
                    self.timings.n_sample += 1
                    if event.id not in self.tok.eog_ids:
                        self._emit(self.pieces.add(event.id), "output")
                elif isinstance(event, Shifted):
                    self.state.c.n_shifts += 1
                    self._emit(self.pieces.flush(), "output")
                    self.ui.newline_if_needed()
                    self.ui.info(f"context full: dropped {event.n_discard} tokens of the oldest turns "
                                 f"(the first {event.n_keep} kept: the system prompt)")
                elif isinstance(event, Stopped):
                    return tuple(reply), event.reason
        finally:
            events.close()
            self._emit(self.pieces.flush(), "output")
        raise AssertionError("generate() ended without a Stopped event")

    def _stop_asked(self, interactive: bool) -> bool:
        """Between steps: True when a Ctrl-C asks to stop generating; a second press (or any, when nobody
        can be given the prompt) quits the chat."""
        act = self.ctrl_c.check(interactive)
        if act == "quit":
            raise _Quit(EXIT_INTERRUPTED)
        return act == "stop"

    def _emit(self, text: str, style: str) -> None:
        if text:
            self.ui.stream(text, style)
            self.transcript.add(text)

    def _eval(self, tokens: tuple[int, ...], sampled: bool) -> None:
        t0 = time.perf_counter()
        self.logits = self.pipeline.eval(list(tokens))                  # (n_vocab,) for the last token
        self._count_eval(len(tokens), 1000.0 * (time.perf_counter() - t0), sampled)

    def _count_eval(self, n_tokens: int, ms: float, sampled: bool) -> None:
        if sampled:
            self.timings.eval_ms += ms      # a sampled token fed back
            self.timings.n_eval += 1
            self.timings.turn_ms += ms
            self.timings.turn_tokens += 1
        else:
            self.timings.prompt_ms += ms
            self.timings.n_prompt_eval += n_tokens

    def _read(self, instruct: bool) -> str | None:
        """The next user turn, handling slash commands and Ctrl-C at the prompt."""
        if self.reader is None:
            return None
        while True:
            try:
                with self.ctrl_c.reading():
                    text = self.reader.read_turn(self, instruct)
            except KeyboardInterrupt:
                raise _Quit(EXIT_INTERRUPTED) from None
            self.timings.turn_tokens, self.timings.turn_ms = 0, 0.0
            if text is None:
                return None
            cmd = parse_command(text)
            if cmd is None:
                return text
            self._command(cmd)

    def _command(self, cmd: Command) -> None:
        ui = self.ui
        if cmd.name == "/help":
            ui.note(help_text())
        elif cmd.name == "/quit":
            raise _Quit(0)
        elif cmd.name == "/reset":
            raise _Restart()
        elif cmd.name == "/stats":
            ui.table(stats_table(self.pipeline.stats(), self.n_evaluated))
            ui.note(timings_text(self.timings.as_dict()))
        elif cmd.name == "/save":
            if not cmd.arg:
                ui.error("/save needs a file name: /save FILE")
                return
            try:
                self._fill_run_facts()
                self.transcript.save(cmd.arg)
                ui.info(f"transcript saved to {cmd.arg}")
            except LlamaMpiError as exc:
                ui.error(str(exc))
        else:
            ui.error(f"unknown command {cmd.arg}; /help lists the commands")

    # -- numbers for the toolbar and the end --------------------------------------------------------

    @property
    def n_evaluated(self) -> int:
        return self.timings.n_prompt_eval + self.timings.n_eval

    def toolbar(self) -> str:
        t = self.timings
        speed = 1000.0 * t.turn_tokens / t.turn_ms if t.turn_ms > 0 else None
        return toolbar_text(self.pipeline.n_past, self.n_ctx, speed, self.rank_ms)

    def refresh_rank_ms(self) -> None:
        """Per-rank compute ms/token for the toolbar (one stats round trip, between turns only)."""
        try:
            per = max(self.n_evaluated, 1)
            self.rank_ms = [s.compute_ms / per for s in self.pipeline.stats()]
        except LlamaMpiError:
            self.rank_ms = []

    def _fill_run_facts(self) -> None:
        t = self.transcript
        if self.conversation is not None:
            t.messages = self.state.messages
        plan = self.pipeline.plan
        t.run = [("ranks", str(len(self.rank_ms) or "?")), ("seed", str(self.seed)),
                 ("context shifts", str(self.state.c.n_shifts)),
                 ("tokens", f"prompt {self.state.c.n_prompt}, generated {self.state.c.n_generated}")]
        if plan is not None:
            t.run += [(f"rank {r.rank}", f"{r.host}, layers {format_layers(r.layers)}"
                       + (f", TP {r.tp_index}/{r.tp_size}" if r.tp_size > 1 else "") + f", {r.threads} thread(s)")
                      for r in plan.ranks]
            t.run.insert(0, ("launch", plan.mode))
        t.timings = timings_text(self.timings.as_dict())

    def finish(self, interrupted: bool) -> None:
        """Timings on stderr (like llama_print_timings) and the --transcript file."""
        self.ctrl_c.pause()
        self.ui.newline_if_needed()
        self.refresh_rank_ms()
        self.ui.info(timings_text(self.timings.as_dict()))
        if self.settings.transcript:
            self._fill_run_facts()
            try:
                self.transcript.save(self.settings.transcript)
            except LlamaMpiError as exc:
                self.ui.error(str(exc))
