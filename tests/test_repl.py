"""Input rules (`\\`, `/`, --multiline-input), scripts, commands and the three readers, without a model."""
from __future__ import annotations

import io

import pytest

from chat.commands import Command, parse_command
from chat.lines import (LineAssembler, ScriptTurn, apply_line_rule, decode_script, join_turn, split_script,
                        wants_more)
from chat.render import Renderer
from chat.repl import NoHooks, PlainReader, ScriptReader, TerminalReader
from chat.script import Transcript, load_script
from core.errors import UsageError


def test_enter_submits_with_newline_backslash_continues_slash_submits_without_newline():
    assert apply_line_rule("hello", False) == ("hello\n", False)
    assert apply_line_rule("hello\\", False) == ("hello\n", True)
    assert apply_line_rule("hello/", False) == ("hello", False)
    assert apply_line_rule("", False) == ("\n", False)            # an empty line is "\n": hands control back


def test_multiline_input_swaps_enter_and_backslash():
    assert apply_line_rule("hello", True) == ("hello\n", True)
    assert apply_line_rule("hello\\", True) == ("hello\n", False)
    assert apply_line_rule("hello/", True) == ("hello", False)     # `/` always submits


def test_line_assembler_builds_one_turn():
    a = LineAssembler(multiline=False)
    assert a.feed("one\\") is None and a.feed("two\\") is None
    assert a.feed("three") == "one\ntwo\nthree\n"
    assert a.feed("no newline/") == "no newline"
    m = LineAssembler(multiline=True)
    assert m.feed("one") is None and m.feed("two") is None and m.feed("end\\") == "one\ntwo\nend\n"
    assert m.feed("partial") is None and m.finish() == "partial\n" and m.finish() is None


def test_join_turn_and_wants_more_match_the_assembler():
    assert join_turn(["a\\", "b"], False) == "a\nb\n"
    assert wants_more("a\\", False) and not wants_more("a", False)
    assert wants_more("a\nb", True) and not wants_more("a\nb\\", True) and not wants_more("x/", True)


def test_script_turns_are_blocks_separated_by_blank_lines():
    text = "first line\nsecond line\n\n\nthird turn/\n\nfour \\\n\ncontinued after a blank\n#! comment\n"
    turns = split_script(text)
    assert [t.lineno for t in turns] == [1, 5, 7]
    assert [t.text() for t in turns] == ["first line\nsecond line\n", "third turn",
                                         "four \n\ncontinued after a blank\n"]


def test_script_with_invalid_utf8_is_a_one_line_error(tmp_path):
    with pytest.raises(UsageError, match=r"script 'x.txt': invalid UTF-8 at line 2 \(byte 6\)"):
        decode_script(b"hello\n\xff\xfe\n", "x.txt")
    with pytest.raises(UsageError, match="not found"):
        load_script(str(tmp_path / "none.txt"))
    good = tmp_path / "s.txt"
    good.write_bytes("caf\u00e9\n\nsecond\n".encode())
    assert [t.text() for t in load_script(str(good))] == ["caf\u00e9\n", "second\n"]


@pytest.mark.parametrize("text, expected", [
    ("/help\n", Command("/help")), ("/quit\n", Command("/quit")), ("  /reset \n", Command("/reset")),
    ("/stats\n", Command("/stats")), ("/save out.md\n", Command("/save", "out.md")),
    ("/hepl\n", Command("unknown", "/hepl")),
    ("/usr/bin is a path\n", None), ("hello /help\n", None), ("//help\n", None), ("plain\n", None),
])
def test_slash_commands(text, expected):
    assert parse_command(text) == expected


def test_plain_reader_applies_the_rules_and_echoes_piped_turns():
    out = io.StringIO()
    ui = Renderer(color=False, out=out, err=io.StringIO())
    r = PlainReader(io.StringIO("a\\\nb\nc/\nlast"), ui, multiline=False, echo=True)
    assert r.read_turn(NoHooks(), False) == "a\nb\n"
    assert r.read_turn(NoHooks(), False) == "c"
    assert r.read_turn(NoHooks(), False) == "last\n"                   # end of input ends the turn
    assert r.read_turn(NoHooks(), False) is None
    assert out.getvalue() == "a\\\nb\nc/\nlast\n"


def test_script_reader_echoes_in_user_colour():
    out = io.StringIO()
    ui = Renderer(color=True, out=out, err=io.StringIO())
    r = ScriptReader([ScriptTurn(1, ("hi",))], ui)
    assert r.read_turn(NoHooks(), False) == "hi\n" and r.read_turn(NoHooks(), False) is None
    assert out.getvalue() == "\x1b[1;32mhi\x1b[0m\n"


def test_renderer_colours_and_no_color(monkeypatch):
    out = io.StringIO()
    Renderer(color=True, out=out, err=io.StringIO()).stream("Once", "prompt")
    assert out.getvalue() == "\x1b[33mOnce\x1b[0m"
    out = io.StringIO()
    Renderer(color=False, out=out, err=io.StringIO()).stream("Once", "prompt")
    assert out.getvalue() == "Once"
    err = io.StringIO()
    Renderer(color=True, out=io.StringIO(), err=err).error("bad")
    assert err.getvalue() == "\x1b[1;31merror: bad\x1b[0m\n"


def test_long_lines_are_not_wrapped_or_padded():
    out = io.StringIO()
    ui = Renderer(color=False, out=out, err=io.StringIO())
    text = "word " * 100
    ui.stream(text)
    assert out.getvalue() == text


def test_piece_stream_never_prints_half_a_character(fixtures):
    """The session streams with Tokenizer.stream_decoder (raw pieces: no leading space removed)."""
    from core.tokenizer import Tokenizer
    tok = Tokenizer.from_path(fixtures / "vocab" / "ggml-vocab-llama-spm.gguf")
    ids = {text: i for i, text in enumerate(tok.vocab.tokens)}
    byte = {b: ids[f"<0x{b:02X}>"] for b in range(256)}                # SPM byte tokens
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9 ", 4: b"\xf0\x9f", 5: b"\x98", 6: b"\x80!"}
    s = tok.stream_decoder(strip_leading_space=False)
    assert ["".join(s.add(byte[b]) for b in pieces[t]) for t in range(1, 7)] == \
        ["caf", "", "\u00e9 ", "", "", "\U0001F600!"]
    assert s.add(byte[0xC3]) == "" and s.flush() == "\ufffd"


def test_transcript_markdown_keeps_run_facts_after_the_conversation():
    t = Transcript(settings=[("model", "m.gguf")])
    t.add("Once")
    t.user("hi\n")
    t.add(" there")
    t.run = [("ranks", "2")]
    t.timings = "load 1 ms"
    md = t.markdown()
    head, run = md.split("## Run")
    assert "```text\nOncehi\n there\n```" in head
    assert "### Turn 1" in head and "ranks: 2" in run and "load 1 ms" in run


def test_terminal_reader_with_prompt_toolkit_pipe_input(monkeypatch, tmp_path):
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))

    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        ui = Renderer(color=False, out=io.StringIO(), err=io.StringIO())
        reader = TerminalReader(ui, multiline=False)
        inp.send_text("one\\\rtwo\r")
        assert reader.read_turn(NoHooks(), False) == "one\ntwo\n"
        inp.send_text("no newline/\r")
        assert reader.read_turn(NoHooks(), False) == "no newline"
        inp.send_text("\x04")                # Ctrl-D on an empty line
        assert reader.read_turn(NoHooks(), False) is None
    assert (tmp_path / "llama-mpi" / "history").read_text().count("+one\\") == 1

    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        reader = TerminalReader(ui, multiline=True)
        inp.send_text("a\rb\\\r")
        assert reader.read_turn(NoHooks(), False) == "a\nb\n"
        inp.send_text("x\x03")               # Ctrl-C at the prompt
        with pytest.raises(KeyboardInterrupt):
            reader.read_turn(NoHooks(), False)


def test_last_row_handed_to_the_line_editor():
    out = io.StringIO()
    ui = Renderer(color=False, out=out, err=io.StringIO())
    ui.stream("Bob: Green.\nUs", "prompt")
    ui.stream("er:", "output")
    assert ui.take_last_row(80) == [("Us", "prompt"), ("er:", "output")]
    ui.stream("\n" + "x" * 85)
    assert ui.take_last_row(80) == [("xxxxx", "output")]            # only the wrapped row's part
    ui.stream("\n" + "y" * 80)
    assert ui.take_last_row(80) == [] and out.getvalue().endswith("y\n")   # a full row: start afresh
    ui.stream("\n\u4e2d\u6587")                                        # wide characters: 2 cells each
    assert ui.take_last_row(3) == [("\u6587", "output")]


def test_stats_table_keeps_long_host_names_and_values_whole_in_80_columns():
    """Under mpiexec the head writes to a pipe (80 columns): nothing in /stats may be cut to "…"."""
    from core.pipeline import RankStats
    from chat.render import stats_table
    host = "worker-node-17.cluster.example.org"
    row = RankStats(rank=1, host=host, layers=range(11, 22), compute_ms=123456.0, wait_ms=7890.0,
                    bytes_per_token=8192, rss_bytes=3 * 2**30, n_past=20, n_ctx=256, weight_bytes=0, kv_bytes=0)
    err = io.StringIO()
    Renderer(False, io.StringIO(), err).table(stats_table([row], 12), to_err=True)
    text = err.getvalue()
    assert "…" not in text
    assert host in text                                       # on one line, whole
    assert "10288.00" in text and "3072.0" in text            # 123456 ms / 12 tokens; 3 GiB in MiB
