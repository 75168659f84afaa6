"""llama-mpi through a real pseudo-terminal (pexpect) on stories260K with 2 ranks.

Spawn mode on a terminal runs prompt_toolkit: we answer its cursor-position requests like a terminal
would, wait for the prompt (bracketed paste switched on), type, press Ctrl-C and Ctrl-D. Under mpiexec
rank 0 has no terminal and reads plain lines; hydra forwards Ctrl-C as SIGINT.
"""
from __future__ import annotations

import json
import re
import time

import pytest

pexpect = pytest.importorskip("pexpect")

from test_cli_support import (PROMPTS, REPO, assert_no_rank_left, chat_cmd, conversation_part,  # noqa: E402
                              mpiexec_or_skip, stories_or_skip, tagged_env)

PROMPT_READY = "\x1b[?2004h"          # prompt_toolkit turns bracketed paste on when the prompt is up
CPR_REQUEST = "\x1b[6n"
YELLOW, BOLD_GREEN = "\x1b[33m", "\x1b[0;32;1m"


def spawn(args: list[str], env: dict, mpiexec_n: int | None = None, timeout: float = 60):
    cmd = chat_cmd(*args)
    if mpiexec_n is not None:
        cmd = [mpiexec_or_skip(), "-n", str(mpiexec_n), *cmd]
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=str(REPO), encoding="utf-8", timeout=timeout,
                          dimensions=(40, 120), codec_errors="replace")
    child.transcript = []
    return child


def start(tmp_path, args: list[str], mpiexec_n: int | None = None):
    """The chat on stories260K (-m given here) in a terminal: (child, the process tag)."""
    env, tag = tagged_env(tmp_path)
    return spawn(["-m", stories_or_skip(), *args], env, mpiexec_n=mpiexec_n), tag


def ends(child, tag: str, status: int = 0) -> None:
    """The chat ended with `status` and no process of the job is left."""
    assert finish(child) == status
    assert_no_rank_left(tag)


def wait_for_prompt(child, timeout: float = 60) -> str:
    """Everything printed until prompt_toolkit shows its prompt; answers CPR requests meanwhile."""
    seen = []
    while True:
        i = child.expect_exact([CPR_REQUEST, PROMPT_READY], timeout=timeout)
        seen.append(child.before)
        if i == 0:
            child.send("\x1b[20;1R")
            continue
        return "".join(seen)


def read_for(child, seconds: float) -> str:
    """Whatever the child prints during `seconds` (answering CPR requests)."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            i = child.expect_exact([CPR_REQUEST, pexpect.TIMEOUT], timeout=max(0.05, end - time.monotonic()))
        except pexpect.EOF:
            out.append(child.before)
            break
        out.append(child.before)
        if i == 0:
            child.send("\x1b[20;1R")
        else:
            child._buffer = child.buffer_type()            # a timeout leaves what it saw in the buffers
            child._before = child.buffer_type()
    return "".join(out)


def wait_all(child, needles: list[str], timeout: float = 60) -> str:
    """Read until every needle has been seen, in any order."""
    seen, end = "", time.monotonic() + timeout
    while not all(n in seen for n in needles):
        if time.monotonic() > end:
            raise AssertionError(f"never saw {needles} in {seen[-500:]!r}")
        seen += read_for(child, 0.3)
    return seen


def finish(child, timeout: float = 30) -> int:
    child.expect(pexpect.EOF, timeout=timeout)
    child.close()
    return child.exitstatus


def test_spawn_terminal_turn_colour_ctrl_c_and_ctrl_d(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    child = spawn(["-m", model, "--np", "2", "--color", "-i", "-p", "Once upon a time", "-n", "-1",
                   "--ignore-eos", "-c", "4096"], env)
    child.expect_exact(YELLOW + " Once upon a time")       # the initial prompt in yellow
    started = read_for(child, 2.0)                          # generating without end (-n -1, EOS banned)
    assert len(started) > 40
    child.sendintr()                                        # first Ctrl-C: stop at the next token
    screen = wait_for_prompt(child, timeout=20)
    assert "Sending Ctrl-C" not in screen                   # the process manager did not see a signal
    toolbar = read_for(child, 0.5)
    child.send("The dog went to the park\r")
    typed = read_for(child, 3.0)
    assert BOLD_GREEN in toolbar + typed                    # the user's input is bold green
    assert re.search(r"ctx \d+/4096", toolbar + typed)      # the bottom toolbar: context fill
    assert len(typed.split("park", 1)[-1]) > 40             # and the model went on after the turn
    child.sendintr()
    wait_for_prompt(child, timeout=20)
    child.sendcontrol("d")                                  # Ctrl-D on an empty line: leave
    rest = child.read() if child.isalive() else ""
    assert finish(child) == 0, rest
    assert "total time" in rest
    assert_no_rank_left(tag)


def test_spawn_ctrl_c_at_the_prompt_exits_130_with_timings(tmp_path):
    child, tag = start(tmp_path, ["--np", "2", "--interactive-first", "-p", "Once"])
    wait_for_prompt(child)
    child.sendintr()
    child.expect_exact("total time")
    ends(child, tag, 130)


def test_spawn_instruct_turn(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    out = tmp_path / "ins.md"
    child = spawn(["-m", model, "--np", "2", "-ins", "-f", str(PROMPTS / "alpaca.txt"), "-n", "64",
                   "--temp", "0", "--transcript", str(out)], env)
    before = wait_for_prompt(child)
    assert before.endswith("\r\n> \r")                      # the input mark, redrawn by the editor
    child.send("Tell me a story about a cat.\r")
    wait_for_prompt(child, timeout=60)                      # the reply ends (-n) and the mark comes back
    child.sendcontrol("d")
    assert finish(child) == 0
    md = out.read_text()
    assert "### Turn 1" in md and "Tell me a story about a cat." in md
    reply = md.split("Model:")[1].split("```text\n")[1].split("\n```")[0]
    assert len(reply.strip()) > 10
    assert_no_rank_left(tag)


def test_mpiexec_plain_mode_reverse_prompt_with_the_chat_file(tmp_path):
    child, tag = start(tmp_path, ["-i", "-r", "User:", "-f", str(PROMPTS / "chat-with-bob.txt"), "-n", "24",
                                  "--temp", "0", "--color"], mpiexec_n=2)
    # the whole prompt in yellow (rich closes the colour before each newline), then control is ours
    child.expect(r"Bob: Green\.(\x1b\[0m)?\r\n(\x1b\[33m)?User:")
    assert PROMPT_READY not in child.before                 # plain line mode: no prompt_toolkit
    time.sleep(0.5)
    child.sendline("What is a spider?")
    reply = read_for(child, 4.0)
    assert "What is a spider?" in reply                     # the terminal echoed the line
    assert len(reply.split("What is a spider?", 1)[1].strip()) > 5
    child.sendeof()                                         # Ctrl-D at the start of a line: end of input
    child.expect_exact("total time")
    ends(child, tag)


def test_mpiexec_ctrl_c_stops_generation_then_input_continues(tmp_path):
    child, tag = start(tmp_path, ["-i", "-p", "Once upon a time", "-n", "2000", "--ignore-eos", "-c", "4096"],
                       mpiexec_n=2)
    child.expect_exact("Once upon a time")
    read_for(child, 0.5)
    child.sendintr()                                        # hydra forwards SIGINT to every rank
    child.expect_exact("Sending Ctrl-C to processes")
    read_for(child, 1.5)
    quiet = read_for(child, 1.5)
    assert quiet.strip() == "", quiet                       # generation stopped, the head waits for input
    child.sendline("The cat")
    more = read_for(child, 2.0)
    assert len(more.split("The cat", 1)[-1]) > 20           # a new turn generates again
    child.sendeof()                                         # (hydra's second Ctrl-C would abort the job)
    child.expect_exact("total time", timeout=90)            # read when the -n budget hands control back
    ends(child, tag)


def test_script_in_a_terminal_transcript_identical_on_1_and_3_ranks(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    script = tmp_path / "turns.txt"
    script.write_text("Hello Bob, how are you?\n\nWhat is a spider?\n")
    mds = []
    for extra in ([], ["--np", "3"]):
        out = tmp_path / f"t{len(extra)}.md"
        child = spawn(["-m", model, "-r", "User:", "-f", str(PROMPTS / "chat-with-bob.txt"), "-n", "32",
                       "--temp", "0", "--color", "--script", str(script), "--transcript", str(out), *extra], env)
        shown = child.read()
        assert finish(child) == 0, shown
        assert BOLD_GREEN.replace("0;", "1;").replace(";1m", "m") in shown or "\x1b[1;32m" in shown
        mds.append(out.read_text())
    assert conversation_part(mds[0]) == conversation_part(mds[1])
    assert_no_rank_left(tag)


def test_readme_first_command_demo_chat_on_two_ranks(tmp_path, smollm2_model):
    env, tag = tagged_env(tmp_path)
    child = spawn(["--np", "2", "--tp", "2", "-cnv", "--temp", "0"], env)  # README: no model -> the demo model,
    before = wait_for_prompt(child, timeout=90)                                 # a conversation, one TP group
    assert f"demo model: {smollm2_model.name}" in before
    assert "plan: spawn, 2 ranks, 30 layers, n_ctx 512, 1 stage(s) of --tp 2" in before
    child.send("What is the capital of France?\r")
    reply = wait_for_prompt(child, timeout=180)            # a reply (the demo bounds it), then asks again
    assert "Paris" in reply
    child.sendcontrol("d")
    ends(child, tag)


def test_mpiexec_ctrl_c_at_the_prompt_exits_130_on_every_rank(tmp_path):
    child, tag = start(tmp_path, ["--interactive-first", "-p", "Once"], mpiexec_n=2)
    wait_all(child, ["Ctrl-D quits", " Once"])              # stdout and stderr come through hydra apart
    time.sleep(0.5)                                         # the prompt was evaluated; the head reads
    child.sendintr()
    child.expect_exact("total time")
    ends(child, tag, 130)


@pytest.mark.parametrize("mode", ["-i", "-n"])
def test_spawn_ctrl_c_exits_130_when_not_interactive_or_pressed_twice(tmp_path, mode):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    extra = ["-i"] if mode == "-i" else []
    child = spawn(["-m", model, "--np", "2", "-p", "Once upon a time", "-n", "-1", "--ignore-eos",
                   "-c", "4096", *extra], env)
    child.expect_exact("Once upon a time")
    read_for(child, 1.0)
    child.send("\x03\x03" if mode == "-i" else "\x03")    # twice while generating / once without -i
    child.expect_exact("total time")
    ends(child, tag, 130)


def test_a_tiny_terminal_does_not_break_the_chat(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path, COLUMNS="8", LINES="3")
    cmd = chat_cmd("-m", model, "--color", "-i", "-r", "User:", "-f", str(PROMPTS / "chat-with-bob.txt"),
                   "-n", "12", "--temp", "0")
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=str(REPO), encoding="utf-8", timeout=60,
                          dimensions=(3, 8), codec_errors="replace")
    wait_for_prompt(child)
    child.send("Hello there, Bob, how are you today?\r")
    wait_for_prompt(child)
    child.sendcontrol("d")
    ends(child, tag)


def test_spawn_plain_line_reader_on_a_terminal_keeps_ctrl_c_from_the_process_manager(tmp_path):
    child, tag = start(tmp_path, ["--np", "2", "--simple-io", "--interactive-first", "-p", "Once", "-n", "2000"])
    wait_all(child, ["Ctrl-D quits", " Once"])
    time.sleep(0.5)
    child.sendline("The cat")
    read_for(child, 1.0)
    child.sendintr()                                        # stop generating: the prompt is back
    read_for(child, 1.0)
    child.send("half a line")
    child.sendintr()                                        # at the prompt: timings, 130, every rank gone
    child.expect_exact("total time")
    assert "Sending Ctrl-C" not in child.before
    ends(child, tag, 130)


def test_load_progress_bars_show_during_a_multi_rank_load_and_are_gone_at_the_prompt(tmp_path, smollm2_model):
    """A terminal sees one bar per rank while the ranks repack their layers; at the first prompt the
    screen (a VT100 emulator fed the whole output) no longer shows them."""
    pyte = pytest.importorskip("pyte")
    env, tag = tagged_env(tmp_path)
    child = spawn(["-m", str(smollm2_model), "--np", "2", "-cnv"], env)
    before = wait_for_prompt(child, timeout=120)
    assert re.search(r"loading rank 0 \(\S+, layers 0-14\)", before)
    assert re.search(r"loading rank 1 \(\S+, layers 15-29\)", before)
    assert "15/15 layers" in before                                     # the bars reached the end
    screen = pyte.Screen(120, 40)
    pyte.Stream(screen).feed(before)
    shown = "\n".join(screen.display)
    assert "plan: spawn, 2 ranks" in shown and "conversation mode" in shown
    assert "loading rank" not in shown and "layers " not in shown.split("conversation mode")[1]
    child.sendcontrol("d")
    ends(child, tag)


def test_conversation_ctrl_c_stops_a_reply_and_the_next_turn_goes_on(tmp_path, smollm2_model):
    """-cnv: Ctrl-C while the model replies gives the prompt back (the turn closed with <|im_end|>); the
    next question is answered; the saved messages hold the cut reply."""
    env, tag = tagged_env(tmp_path)
    saved = tmp_path / "chat.json"
    child = spawn(["-m", str(smollm2_model), "--np", "2", "-cnv", "--temp", "0", "-n", "-1"], env)
    wait_for_prompt(child, timeout=120)
    child.send("Tell me a long story about a dragon.\r")
    read_for(child, 3.0)                                     # the reply is streaming
    child.sendintr()
    wait_for_prompt(child, timeout=60)
    child.send("What is the capital of France?\r")
    assert "Paris" in wait_for_prompt(child, timeout=120)
    child.send(f"/save {saved}\r")
    wait_for_prompt(child)
    child.sendcontrol("d")
    ends(child, tag)
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert len(messages[1]["content"]) > 10                  # what was shown before the press
    assert "Paris" in messages[3]["content"]
