"""Type-ahead: keys typed while the model generates (or the cluster starts) are kept for the next prompt,
as llama.cpp's `main` leaves them in the terminal's input queue.

The buffer (chat/repl.py's TypeAhead) and the readers are tested directly; the terminal watcher and the
start-up reader on a pseudo-terminal pair; the whole chat through pexpect on stories260K, typing while it
generates and finishing the line at the prompt (prompt_toolkit and --simple-io).
"""
from __future__ import annotations

import io
import os
import pty
import re
import select
import time
from pathlib import Path

import pytest

from chat.interrupts import ChatCtrlC, CtrlCWatcher, LoadingCtrlC, make_chat_ctrl_c
from chat.render import Renderer
from chat.repl import NoHooks, PlainReader, ScriptReader, TerminalReader, TypeAhead

# -- the buffer -------------------------------------------------------------------------------------


def fed(*chunks: bytes) -> TypeAhead:
    t = TypeAhead()
    for chunk in chunks:
        assert t.feed(chunk) == 0
    return t


def test_text_is_kept_across_reads():
    assert fed(b"zeb", b"ra").text == "zebra"


def test_utf8_split_between_reads_stays_whole():
    assert fed(b"caf\xc3", b"\xa9 cr\xc3\xa8", b"me").text == "caf\u00e9 cr\u00e8me"
    assert fed(b"\xf0\x9f", b"\x98", b"\x80!").text == "\U0001F600!"
    assert fed(b"bad \xff byte").text == "bad \ufffd byte"          # invalid UTF-8: U+FFFD, like the readers


@pytest.mark.parametrize("keys", [
    [b"zeb\x1b[Dra"],                     # left arrow
    [b"ze\x1b", b"[", b"1;5", b"Cbra"],   # Ctrl+right, split over four reads
    [b"zeb\x1bOAra"],                     # up arrow in application-cursor mode
    [b"zebra\x1b[20;1R"],                 # a cursor-position report arriving late
    [b"zeb\x1b[3~ra"],                    # Delete
    [b"zebra\x1b[15~"],                   # F5
    [b"zeb\x1bxra"],                      # Alt+x
    [b"zeb\x1b]11;rgb:0/0/0\x07ra"],      # an OSC reply ended by BEL
    [b"zeb\x1b]11;?\x1b\\ra"],            # ... and by ST
])
def test_escape_sequences_are_dropped(keys):
    assert fed(*keys).text == "zebra"


def test_line_editing_keys_and_other_controls():
    assert fed(b"zebrx\x7fa").text == "zebra"                        # Backspace (DEL)
    assert fed(b"zebrx\x08a").text == "zebra"                        # Backspace (BS)
    assert fed(b"one\n\x7f\x7fzebra").text == "one\nzebra"            # never into an ended line
    assert fed(b"junk junk\x15zebra").text == "zebra"                # Ctrl-U
    assert fed(b"zebra  crossx\x17crossing").text == "zebra  crossing"   # Ctrl-W
    assert fed(b"ze\x04b\x00r\x07a\tx").text == "zebra\tx"              # Ctrl-D, NUL, BEL dropped; Tab kept
    assert fed(b"a\rb\nc\r\nd\r", b"\ne").text == "a\nb\nc\nd\ne"     # CR, LF, CR LF: one Enter each


def test_ctrl_d_on_an_empty_line_ends_the_input_after_what_came_before():
    """As a canonical terminal's read() returns 0 for Ctrl-D on an empty line (llama.cpp's `main` then
    exits): the turns typed before it first, then None; keys after it are dropped."""
    t = fed(b"\x04")
    assert t.take_turn(False) == (None, False)
    t = fed(b"one\rtwo\n\x04three\n")
    assert [t.take_turn(False), t.take_turn(False), t.take_turn(False)] == [("one", True), ("two", True),
                                                                         (None, False)]
    t = fed(b"zeb\x04ra\n")                     # inside a line: dropped, the line goes on
    assert t.take_turn(False) == ("zebra", True) and t.take_turn(False) == ("", False)
    t = TypeAhead()
    assert t.feed(b"\x04\x03zebra") == 1           # Ctrl-C after it empties the queue, the end included
    assert t.take_turn(False) == ("zebra", False)
    primary = fed(b"\x04")
    t = fed(b"one\n")
    t.absorb(primary)                                # keys typed while the cluster started keep it
    assert t.take_turn(False) == ("one", True) and t.take_turn(False) == (None, False)


def test_readers_end_at_a_ctrl_d_typed_ahead():
    ui, _ = quiet_ui()
    r = PlainReader(io.StringIO("never read\n"), ui, multiline=False, echo=False, typed=fed(b"hello\n\x04"))
    assert r.read_turn(NoHooks(), False) == "hello\n"
    assert r.read_turn(NoHooks(), False) is None


def test_ctrl_c_empties_what_was_typed_before_it_and_is_counted():
    t = TypeAhead()
    assert t.feed(b"zebra\x1b[") == 0
    assert t.feed(b"cross\x03cro") == 1 and t.text == "cro"          # the half escape is gone too
    assert t.feed(b"ss\x03\x03ing") == 2 and t.text == "ing"
    assert t.feed(b"x\x03\xc3") == 1 and t.feed(b"\xa9") == 0 and t.text == "\u00e9"   # a half character after it stays
    t.discard()
    assert t.text == "" and t.take_turn(False) == ("", False)


def test_take_turn_hands_whole_lines_over_one_turn_at_a_time():
    t = fed(b"hello\nsecond\\\nline\n/stats\nzeb")
    assert t.take_turn(False) == ("hello", True)
    assert t.take_turn(False) == ("second\\\nline", True)             # `\` continues the turn
    assert t.take_turn(False) == ("/stats", True)
    assert t.take_turn(False) == ("zeb", False)                       # the line being typed
    assert t.take_turn(False) == ("", False)
    assert fed(b"\n").take_turn(False) == ("", True)                 # Enter alone: an empty turn
    assert fed(b"no newline/\nx").take_turn(False) == ("no newline/", True)
    t = fed(b"one\\\nzeb")                                          # a continued turn, unfinished
    assert t.take_turn(False) == ("one\\\nzeb", False) and t.text == ""
    t = fed(b"one\ntwo\\\nthree")                                   # --multiline-input: `\` ends it
    assert t.take_turn(True) == ("one\ntwo\\", True) and t.take_turn(True) == ("three", False)


def test_absorb_moves_text_and_half_read_state():
    start, chat = TypeAhead(), TypeAhead()
    start.feed(b"zebra caf\xc3")
    chat.absorb(start)
    assert start.text == "" and chat.text == "zebra caf"
    chat.feed(b"\xa9")
    assert chat.text == "zebra caf\u00e9"
    chat.absorb(chat)
    assert chat.text == "zebra caf\u00e9"


# -- the readers ------------------------------------------------------------------------------------


def quiet_ui(color: bool = False) -> tuple[Renderer, io.StringIO]:
    out = io.StringIO()
    return Renderer(color=color, out=out, err=io.StringIO()), out


def test_plain_reader_shows_what_was_typed_ahead_and_goes_on_with_the_line():
    ui, out = quiet_ui()
    typed = fed(b"hello\nzebra")
    r = PlainReader(io.StringIO(" crossing\n"), ui, multiline=False, echo=False, typed=typed)
    assert r.read_turn(NoHooks(), False) == "hello\n"                      # a whole line: sent, nothing read
    assert r.read_turn(NoHooks(), False) == "zebra crossing\n"
    assert out.getvalue() == "hello\nzebra"                            # shown as the terminal would have
    assert r.read_turn(NoHooks(), False) is None


def test_plain_reader_type_ahead_keeps_the_line_rules_and_end_of_input():
    ui, _ = quiet_ui()
    r = PlainReader(io.StringIO("two\n"), ui, multiline=False, echo=False, typed=fed(b"one\\\n"))
    assert r.read_turn(NoHooks(), False) == "one\ntwo\n"
    r = PlainReader(io.StringIO(""), ui, multiline=False, echo=False, typed=fed(b"zeb"))
    assert r.read_turn(NoHooks(), False) == "zeb\n"                        # Ctrl-D after it: the line as it is
    assert r.read_turn(NoHooks(), False) is None
    ui, out = quiet_ui(color=True)
    r = PlainReader(io.StringIO("ra\n"), ui, multiline=False, echo=False, typed=fed(b"zeb"))
    assert r.read_turn(NoHooks(), False) == "zebra\n"
    assert out.getvalue().endswith("zeb\x1b[0m\x1b[1;32m\x1b[0m")    # green again for the rest of the line


def test_terminal_reader_prefills_the_editor_and_submits_whole_lines(monkeypatch, tmp_path):
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    typed = fed(b"hello\nsecond\\\nline\nzebra")
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        reader = TerminalReader(quiet_ui()[0], multiline=False, typed=typed)
        assert reader.read_turn(NoHooks(), False) == "hello\n"               # nothing typed at the prompt
        assert reader.read_turn(NoHooks(), False) == "second\nline\n"
        inp.send_text(" crossing\r")                                            # the cursor is at the end
        assert reader.read_turn(NoHooks(), False) == "zebra crossing\n"
        typed.feed(b"caf\xc3\xa9")
        inp.send_text("\x7f\x7f\x7f\x7f\x7fcrossing\r")                          # and it edits like typed text
        assert reader.read_turn(NoHooks(), False) == "crossing\n"
    history = (tmp_path / "llama-mpi" / "history").read_text()
    assert "+hello" in history and "+zebra crossing" in history


def test_make_chat_ctrl_c_wires_the_readers_buffer_and_takes_over_the_start_up_keys():
    ui, _ = quiet_ui()
    reader = PlainReader(io.StringIO(""), ui, multiline=False, echo=False)
    primary, replica = pty.openpty()
    try:
        loading = LoadingCtrlC(replica)
        try:
            os.write(primary, "zebra caf\u00e9".encode()[:-1])
            wait_until(lambda: loading.keys.typed.text == "zebra caf")
            make_chat_ctrl_c(reader, loading)                # (stdin is no terminal here: no watcher)
            assert reader.typed.text == "zebra caf" and loading.keys.typed is reader.typed
            os.write(primary, "\u00e9 x".encode()[1:])        # typed before the start-up reader stops
            wait_until(lambda: reader.typed.text == "zebra caf\u00e9 x")
        finally:
            loading.stop()
    finally:
        os.close(primary)
        os.close(replica)
    assert isinstance(make_chat_ctrl_c(ScriptReader([], ui)), ChatCtrlC)       # a script: nothing to keep


def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_raw_mode_reader_gets_the_terminal_as_generation_left_it():
    """Reading with prompt_toolkit (raw_reader): the watcher stops reading but leaves the terminal without
    echo and line discipline, so a Ctrl-D typed before prompt_toolkit starts stays a byte in the queue;
    generation resumes in that mode, and at the end the terminal is the user's again."""
    import termios
    primary, replica = pty.openpty()
    try:
        user = termios.tcgetattr(replica)
        ctrl_c = ChatCtrlC(CtrlCWatcher(replica, TypeAhead()), raw_reader=True)
        with ctrl_c:
            with ctrl_c.reading():
                assert not ctrl_c.keys.active
                assert not termios.tcgetattr(replica)[3] & (termios.ICANON | termios.ECHO)
                os.write(primary, b"\x04")
                time.sleep(0.1)
                assert os.read(replica, 16) == b"\x04"              # canonical mode would read b"" (EOF)
            assert ctrl_c.keys.active and not termios.tcgetattr(replica)[3] & termios.ICANON
        assert termios.tcgetattr(replica) == user
        ctrl_c = ChatCtrlC(CtrlCWatcher(replica, TypeAhead()))        # a plain reader: the user's modes
        with ctrl_c:
            with ctrl_c.reading():
                assert termios.tcgetattr(replica) == user
        assert termios.tcgetattr(replica) == user
    finally:
        os.close(primary)
        os.close(replica)


def test_a_line_reader_chat_leaves_the_terminal_as_the_user_had_it():
    """Generation after a line reader's turn saved the line reader's attributes (signals off, Ctrl-C as an
    end of line) as the user's, so a --simple-io chat on a terminal left it without Ctrl-C at exit."""
    import termios
    primary, replica = pty.openpty()
    try:
        user = termios.tcgetattr(replica)
        ctrl_c = ChatCtrlC(CtrlCWatcher(replica, TypeAhead()), line_reader=True)
        with ctrl_c:
            for _ in range(2):                                # two turns, generation after each
                with ctrl_c.reading():
                    attrs = termios.tcgetattr(replica)
                    assert attrs[3] & termios.ICANON and not attrs[3] & termios.ISIG
                assert ctrl_c.keys.active
        assert termios.tcgetattr(replica) == user
    finally:
        os.close(primary)
        os.close(replica)


def test_a_ctrl_d_typed_right_after_enter_at_a_line_readers_prompt_ends_the_chat():
    """A line reader's turn is read, then Ctrl-D comes before generation starts (typed or pasted right
    after Enter): left in the queue, the canonical end of file became a NUL byte once the terminal left
    canonical mode, and was dropped; the chat sat at its next prompt (test_ctrl_d_typed_as_the_prompt_
    appears_ends_the_chat[plain] failed 1 run in 6 that way). Lines and a Ctrl-C typed there are kept."""
    primary, replica = pty.openpty()
    try:
        for keys, turn, presses in ((b"\x04", (None, False), 0), (b"two\rthree\r", ("two", True), 0),
                                    (b"ab\x03", ("", False), 1)):
            typed = TypeAhead()
            ctrl_c = ChatCtrlC(CtrlCWatcher(replica, typed), line_reader=True)
            with ctrl_c:
                with ctrl_c.reading():
                    os.write(primary, b"one\r" + keys)
                    time.sleep(0.1)
                    assert os.read(replica, 100) == b"one\n"          # the turn the line reader reads
                assert ctrl_c.keys.poll() == presses                    # generation: the keys after it
                assert typed.take_turn(multiline=False) == turn
    finally:
        os.close(primary)
        os.close(replica)


def test_watcher_keeps_keys_and_reading_takes_the_last_ones_first():
    primary, replica = pty.openpty()
    try:
        typed = TypeAhead()
        ctrl_c = ChatCtrlC(CtrlCWatcher(replica, typed))
        with ctrl_c:
            os.write(primary, b"zeb")
            wait_until(lambda: ctrl_c.keys.poll() == 0 and typed.text == "zeb")
            os.write(primary, b"ra\x03cross")                 # Ctrl-C while generating: what came before goes
            time.sleep(0.1)
            assert ctrl_c.check(interactive=True) == "stop" and typed.text == "cross"
            os.write(primary, b"ing")                         # typed after the last check(), before the prompt
            time.sleep(0.1)
            with ctrl_c.reading():
                assert typed.text == "crossing"
                assert not ctrl_c.keys.active                 # the terminal is the user's again
            typed.discard()
            os.write(primary, b"ze\x03")                      # a press after the last check(): at the prompt
            time.sleep(0.1)
            with pytest.raises(KeyboardInterrupt):
                with ctrl_c.reading():
                    pass
    finally:
        os.close(primary)
        os.close(replica)


def test_keys_typed_between_the_last_poll_and_the_line_readers_terminal_are_kept():
    """A key that reaches the terminal after the watcher's last poll() but before a line reader has the
    terminal canonical again (the moment the prompt appears): Linux hands it to the next read() as a literal
    byte, so a Ctrl-D there was a "\x04" in a line, not an end of file, and the chat sat at its prompt
    (test_ctrl_d_typed_as_the_prompt_appears_ends_the_chat[plain] failed 1 run in 6). Such keys now go to
    the TypeAhead, a Ctrl-C among them is a press at the prompt, and the terminal is left as the user's."""
    import termios
    primary, replica = pty.openpty()
    try:
        user = termios.tcgetattr(replica)
        for keys, turn in ((b"\x04", (None, False)), (b"hi\r", ("hi", True)), (b"par", ("par", False))):
            typed = TypeAhead()
            watcher = CtrlCWatcher(replica, typed)
            watcher.resume()
            os.write(primary, keys)                           # after the last poll(), none follows
            time.sleep(0.1)
            assert watcher.pause(line_reader=True) == 0
            assert typed.take_turn(multiline=False) == turn
            assert termios.tcgetattr(replica)[3] & termios.ICANON
            assert not select.select([replica], [], [], 0.1)[0]     # nothing left for the line reader
            watcher.pause()
            assert termios.tcgetattr(replica) == user
        ctrl_c = ChatCtrlC(CtrlCWatcher(replica, TypeAhead()), line_reader=True)
        with ctrl_c:
            ctrl_c.keys.poll = lambda: 0                      # the key arrives just after the last poll()
            os.write(primary, b"ab\x03")
            time.sleep(0.1)
            with pytest.raises(KeyboardInterrupt):
                with ctrl_c.reading():
                    pass
        assert termios.tcgetattr(replica) == user
    finally:
        os.close(primary)
        os.close(replica)


# -- the chat on a terminal -------------------------------------------------------------------------

pexpect = pytest.importorskip("pexpect")

from test_cli_support import assert_no_rank_left, stories_or_skip, tagged_env  # noqa: E402
from test_pty import finish, read_for, spawn, wait_for_prompt  # noqa: E402

# a turn long enough that keys typed over ~0.5 s all arrive while it generates: stories260K decodes a token
# in ~0.7-1.1 ms here (~1.6 ms in these pty tests), so 500 tokens ended in ~0.5 s and a key could reach the prompt instead
LONG = ["-n", "1500", "-c", "2048", "--ignore-eos", "--temp", "0"]


def user_turns(md: Path) -> list[str]:
    """The user turns of a --transcript file, as typed (one trailing newline removed)."""
    return [m.group(2) for m in re.finditer(r"### Turn \d+\n\nUser:\n\n(`{3,})text\n(.*?)\n\1",
                                            md.read_text(), re.S)]


def start_chat(tmp_path: Path, *args: str):
    """The chat on stories260K in a terminal, with a transcript: (child, transcript path, process tag)."""
    env, tag = tagged_env(tmp_path)
    md = tmp_path / "t.md"
    return spawn(["-m", stories_or_skip(), *args, "--transcript", str(md)], env), md, tag


def end_chat(child, md: Path, tag: str, eof: str = "d") -> list[str]:
    """Ctrl-D at the prompt (or end of input on the plain path): exit 0, no rank left; the user turns."""
    if eof == "d":
        wait_for_prompt(child)
        child.sendcontrol("d")
    else:
        wait_quiet(child)
        child.sendeof()
    assert finish(child) == 0
    assert_no_rank_left(tag)
    return user_turns(md)


def typed_while_generating(child, keys: bytes | list[bytes]) -> str:
    """Wait for the first words of the story, type `keys` (pieces a little apart), and return what the
    model printed after them until the prompt is up (proof that they were typed while it generated)."""
    child.expect_exact("Once upon a time")
    read_for(child, 0.2)
    for piece in [keys] if isinstance(keys, bytes) else keys:
        os.write(child.child_fd, piece)
        time.sleep(0.1)
    return wait_for_prompt(child)


def wait_quiet(child, quiet: float = 1.5, timeout: float = 60) -> str:
    """Everything printed until nothing more comes for `quiet` seconds (the plain reader waits)."""
    out, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        got = read_for(child, quiet)
        if not got:
            return "".join(out)
        out.append(got)
    raise AssertionError(f"still printing after {timeout} s: {''.join(out)[-300:]!r}")


def test_prompt_toolkit_keeps_what_was_typed_while_generating(tmp_path):
    child, md, tag = start_chat(tmp_path, "-i", "-p", "Once upon a time", *LONG)
    screen = typed_while_generating(child, b"zebra")
    assert len(screen) > 200, screen                       # the model went on after the keys
    shown = read_for(child, 0.5)
    assert "zebra" in shown                                # pre-filled at the prompt
    child.send(" crossing\r")
    assert end_chat(child, md, tag) == ["zebra crossing"]


def test_plain_reader_keeps_what_was_typed_while_generating(tmp_path):
    child, md, tag = start_chat(tmp_path, "--simple-io", "-i", "-p", "Once upon a time", *LONG)
    child.expect_exact("Once upon a time")
    read_for(child, 0.2)
    child.send("zebra")
    child.expect_exact("zebra", timeout=60)                # not echoed while generating: shown at the prompt
    assert len(child.before.split("Once upon a time", 1)[-1]) > 200
    child.send(" crossing\r")
    assert end_chat(child, md, tag, eof="eof") == ["zebra crossing"]


def test_whole_lines_typed_ahead_are_sent_in_order(tmp_path):
    child, md, tag = start_chat(tmp_path, "-i", "-p", "Once upon a time", *LONG)
    typed_while_generating(child, b"the cat\\\nsat\rzeb")  # a turn of two lines, then a line begun
    wait_for_prompt(child)                                  # the turn was sent; the model answered it
    child.send("ra crossing\r")
    assert end_chat(child, md, tag) == ["the cat\nsat", "zebra crossing"]


def test_multibyte_characters_and_arrow_keys_typed_ahead(tmp_path):
    child, md, tag = start_chat(tmp_path, "-i", "-p", "Once upon a time", *LONG)
    typed_while_generating(child, [b"caf\xc3", b"\xa9\x1b[D\x1b", b"[D"])   # split é; two left arrows, dropped
    child.send(" crossing\r")
    assert end_chat(child, md, tag) == ["caf\u00e9 crossing"]


def test_ctrl_c_while_generating_discards_what_was_typed_before_it(tmp_path):
    child, md, tag = start_chat(tmp_path, "-i", "-p", "Once upon a time", "-n", "-1", "--ignore-eos", "-c", "4096",
                                "--temp", "0")
    typed_while_generating(child, [b"zebra", b"\x03cro"])   # kept: only what follows the press
    child.send("ssing\r")
    read_for(child, 1.0)
    child.sendintr()
    assert end_chat(child, md, tag) == ["crossing"]


@pytest.mark.parametrize("simple_io", [[], ["--simple-io"]], ids=["prompt_toolkit", "plain"])
def test_ctrl_d_typed_while_generating_ends_the_chat_after_the_reply(tmp_path, simple_io):
    """Ctrl-D on an empty line while the model generates (or just before the prompt reads the terminal):
    the reply finishes, then the chat exits 0 as Ctrl-D at the prompt does, never waiting at a prompt."""
    child, md, tag = start_chat(tmp_path, *simple_io, "-i", "-p", "Once upon a time", *LONG)
    child.expect_exact("Once upon a time")
    read_for(child, 0.2)
    os.write(child.child_fd, b"\x04")
    assert finish(child, timeout=60) == 0, child.before[-300:]
    assert len(child.before) > 200, child.before              # the model went on after the key
    assert_no_rank_left(tag)
    assert user_turns(md) == []


@pytest.mark.parametrize("simple_io", [[], ["--simple-io"]], ids=["prompt_toolkit", "plain"])
def test_ctrl_d_typed_as_the_prompt_appears_ends_the_chat(tmp_path, simple_io):
    """Ctrl-D the moment "> " shows after a reply, before the reader has the terminal: the chat exits 0.
    It used to be lost with prompt_toolkit (the terminal was back in canonical mode for those
    milliseconds, which turned the key into an end of file prompt_toolkit never saw) and the chat sat
    at its prompt."""
    child, md, tag = start_chat(tmp_path, *simple_io, "-cnv", "-p", "Hi", "-n", "8", "--temp", "0")
    child.expect_exact("\r\n\r\n> ", timeout=60)              # the reply ended; the next prompt's row
    if not simple_io:
        wait_for_prompt(child)
    child.send("Once\r")                                       # a turn typed at the prompt, then its reply
    child.expect_exact("\r\n\r\n> ", timeout=60)
    os.write(child.child_fd, b"\x04")
    assert finish(child, timeout=20) == 0, child.before[-300:]
    assert_no_rank_left(tag)


def test_keys_typed_while_the_cluster_starts_reach_the_first_prompt(tmp_path):
    child, md, tag = start_chat(tmp_path, "--np", "2", "--interactive-first", "-p", "Once", "-n", "16", "--temp", "0")
    time.sleep(0.3)                                         # (python starting; the start-up reader soon)
    child.send("zebra")
    shown = wait_for_prompt(child) + read_for(child, 0.5)
    assert "zebra" in shown
    child.send(" crossing\r")
    assert end_chat(child, md, tag) == ["zebra crossing"]
