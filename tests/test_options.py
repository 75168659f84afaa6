"""chat/options.py: llama.cpp main's flags and defaults, ranges, aliases, options files, escapes."""
from __future__ import annotations

import math

import pytest

from chat.options import (ChatOptions, fill_prompt_vars, no_effect_reason, parse_options, process_escapes)
from core.errors import UsageError
from core.sampling import SamplingParams


def test_defaults_are_llama_cpp_mains_late_2023():
    o = parse_options([])
    assert (o.n_ctx, o.n_batch, o.n_predict, o.n_keep, o.seed) == (512, 512, -1, 0, -1)
    assert (o.top_k, o.tfs_z, o.typical_p, o.top_p, o.min_p, o.temp) == (40, 1.0, 1.0, 0.95, 0.05, 0.8)
    assert (o.repeat_last_n, o.repeat_penalty, o.frequency_penalty, o.presence_penalty) == (64, 1.1, 0.0, 0.0)
    assert (o.mirostat, o.mirostat_tau, o.mirostat_eta, o.penalize_nl) == (0, 5.0, 0.1, True)
    assert not (o.interactive or o.interactive_first or o.instruct or o.color or o.escape)
    assert o.demo and o.model is None


def test_sampling_fields_agree_with_sampling_params():
    o = parse_options([])
    for name, f in SamplingParams.__dataclass_fields__.items():
        assert getattr(o, name) == f.default, name


def test_every_flag_parses():
    o = parse_options([
        "-m", "m.gguf", "--np", "3", "--hostfile", "hosts", "--mpi-layer-split", "2,1,1", "-t", "2",
        "-c", "256", "-b", "64", "-p", "hi", "--prompt-var", "USER=Ann", "-e", "-i", "--interactive-first",
        "-ins", "-r", "User:", "-r", "Bob:", "--in-prefix", " ", "--in-suffix", "AI:", "--in-prefix-bos",
        "--multiline-input", "-n", "-2", "--keep", "-1", "--ignore-eos", "--verbose-prompt", "-s", "42",
        "-l", "15043+1", "-l", "2-inf", "--repeat-last-n", "32", "--repeat-penalty", "1.2",
        "--frequency-penalty", "0.5", "--presence-penalty", "-0.5", "--no-penalize-nl", "--top-k", "0",
        "--tfs", "0.9", "--typical", "0.8", "--top-p", "0.5", "--min-p", "0.1", "--temp", "0",
        "--mirostat", "2", "--mirostat-lr", "0.2", "--mirostat-ent", "3", "--color", "--simple-io",
        "--script", "s.txt", "--transcript", "out.md"])
    assert o.model == "m.gguf" and o.np == 3 and o.hostfile == "hosts" and o.mpi_layer_split == [2.0, 1.0, 1.0]
    assert (o.threads, o.n_ctx, o.n_batch, o.n_predict, o.n_keep, o.seed) == (2, 256, 64, -2, -1, 42)
    assert o.reverse_prompts == ("User:", "Bob:") and o.prompt_vars == (("USER", "Ann"),)
    assert o.logit_bias == ((15043, 1.0), (2, -math.inf))
    assert o.interactive and o.interactive_first and o.instruct and o.input_prefix_bos and o.multiline_input
    assert (o.input_prefix, o.input_suffix, o.ignore_eos, o.verbose_prompt) == (" ", "AI:", True, True)
    assert (o.top_k, o.tfs_z, o.typical_p, o.top_p, o.min_p, o.temp) == (0, 0.9, 0.8, 0.5, 0.1, 0.0)
    assert (o.mirostat, o.mirostat_eta, o.mirostat_tau, o.penalize_nl) == (2, 0.2, 3.0, False)
    assert o.color and o.simple_io and o.script == "s.txt" and o.transcript == "out.md"
    assert not o.demo


def test_underscore_aliases():
    o = parse_options(["--top_p", "0.5", "--in_prefix=>", "--n_predict", "7", "--interactive_first",
                       "--mpi_layer_split", "1,1", "--ctx_size", "64"])
    assert (o.top_p, o.input_prefix, o.n_predict, o.interactive_first, o.n_ctx) == (0.5, ">", 7, True, 64)


@pytest.mark.parametrize("argv, message", [
    (["--foo"], "unknown option --foo"),
    (["--foo_baz=1"], "unknown option --foo_baz"),
    (["--top-p", "1.5"], "--top-p 1.5 is out of range: must be in [0.0, 1.0]"),
    (["--min-p", "-0.1"], "--min-p -0.1 is out of range: must be in [0.0, 1.0]"),
    (["--temp", "-1"], "--temp -1 is out of range: must be >= 0.0"),
    (["--repeat-penalty", "0"], "--repeat-penalty 0 is out of range: must be > 0.0"),
    (["--mirostat", "3"], "--mirostat 3 is out of range: must be 0 (off), 1 or 2"),
    (["--top-k", "-5"], "--top-k -5 is out of range: must be >= 0"),
    (["-n", "-3"], "-n/--n-predict -3 is out of range: must be >= -2"),
    (["-n", "ten"], "-n/--n-predict: 'ten' is not an integer"),
    (["-np", "2"], "unknown option -np"),
    (["--rope-freq-base", "0"], "--rope-freq-base 0 is out of range: must be > 0.0"),
    (["--rope-scale", "4", "--rope-freq-scale", "0.5"], "--rope-scale and --rope-freq-scale both given"),                 # not "-n p": a word is never split into a flag
    (["-nkeep"], "unknown option -nkeep"),
    (["-ngl"], "argument -ngl/--n-gpu-layers/--gpu-layers: expected one argument"),
    (["--temp", "hot"], "--temp: 'hot' is not a number"),
    (["--temp", "nan"], "--temp nan is out of range"),
    (["-s", "-2"], "-s/--seed -2 is out of range"),
    (["-c", "-1"], "-c/--ctx-size -1 is out of range: must be >= 0"),
    (["-p"], "argument -p/--prompt: expected one argument"),
    (["-l", "15043"], "-l/--logit-bias: '15043' is not TOKEN_ID+BIAS"),
    (["--prompt-var", "X"], "--prompt-var: 'X' is not NAME=VALUE"),
    (["--mpi-layer-split", "1,x"], "--mpi-layer-split: '1,x' is not a comma-separated list"),
    (["--np", "2", "--mpi-layer-split", "1,1,1"], "--mpi-layer-split has 3 weights but --np is 2"),
    (["--np", "2", "--mpi-layer-split", "1"], "--mpi-layer-split has 1 weight but --np is 2"),
    (["-p", "a", "-f", "b"], "-p/--prompt and -f/--file both given"),
    (["missing-options.txt"], "options file 'missing-options.txt' not found"),
])
def test_bad_input_is_one_line_naming_the_option(argv, message):
    with pytest.raises(UsageError) as err:
        parse_options(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_options_file_uses_shell_syntax_and_the_command_line_wins(tmp_path):
    f = tmp_path / "options.txt"
    f.write_text('# node options\n-m "/models/my model.gguf" -t 4\n-p \'say "hi"\'  # the prompt\n'
                 '-r "User:" -n 16\n')
    o = parse_options([str(f)])
    assert (o.model, o.threads, o.prompt, o.reverse_prompts, o.n_predict) == \
        ("/models/my model.gguf", 4, 'say "hi"', ("User:",), 16)
    assert o.options_file == str(f)
    assert o.file_argv == ("-m", "/models/my model.gguf", "-t", "4", "-p", 'say "hi"', "-r", "User:", "-n", "16")
    o = parse_options([str(f), "-n", "8", "-t", "1"])
    assert (o.n_predict, o.threads) == (8, 1)
    bad = tmp_path / "bad.txt"
    bad.write_text("--top-k x\n")
    with pytest.raises(UsageError, match="--top-k: 'x' is not an integer"):
        parse_options([str(bad)])
    unbalanced = tmp_path / "q.txt"
    unbalanced.write_text('-p "open\n')
    with pytest.raises(UsageError, match="options file"):
        parse_options([str(unbalanced)])


def test_process_escapes_like_llama_cpp():
    assert process_escapes(r"a\nb\tc\\d\"e\'f\rg") == "a\nb\tc\\d\"e'f\rg"
    assert process_escapes(r"\x41\x62") == "Ab"
    assert process_escapes(r"\xe2\x96\x81") == "\u2581"          # bytes, like the C++ original
    assert process_escapes(r"\q \x4 \\") == "\\q \\x4 \\"        # unknown escapes stay
    o = parse_options(["-e", "-p", r"one\ntwo", "-r", r"User:\n", "--in-prefix", r"\t"])
    assert (o.prompt, o.reverse_prompts, o.input_prefix) == ("one\ntwo", ("User:\n",), "\t")
    assert parse_options(["-p", r"one\ntwo"]).prompt == r"one\ntwo"


def test_prompt_vars_fill_placeholders_and_missing_ones_are_errors():
    v = (("USER", "Ann"), ("AI", "Bob"))
    assert fill_prompt_vars("[[USER]]: hi\n[[AI]]:", v, "prompt") == "Ann: hi\nBob:"
    with pytest.raises(UsageError, match=r"placeholder \[\[AI\]\] has no value; pass --prompt-var AI="):
        fill_prompt_vars("[[USER]] and [[AI]]", v[:1], "prompt")
    assert fill_prompt_vars("a [[not a name]] b", (), "prompt") == "a [[not a name]] b"


def test_interactive_modes():
    assert not parse_options([]).is_interactive
    for flag in (["-i"], ["--interactive-first"], ["-ins"], ["--instruct"], ["--script", "x"]):
        assert parse_options(flag).is_interactive, flag
    assert isinstance(parse_options([]), ChatOptions)


def test_command_line_validity_leaves_the_options_file_aside(tmp_path):
    from chat.options import command_line_is_valid
    bad = tmp_path / "node.txt"
    bad.write_text("--top-k x\n")
    assert command_line_is_valid([str(bad), "-n", "4"])        # the file is at fault, not the line
    assert not command_line_is_valid([str(bad), "--nope"])
    assert not command_line_is_valid(["-p", "a", "-f", "b"])


def test_llama_cpp_flags_without_effect_are_accepted_and_recorded():
    """An options file written for llama.cpp's main keeps working; the head names these (see test_cli)."""
    o = parse_options(["-m", "m.gguf", "-ngl", "99", "--mlock", "-n", "5", "--no-mmap", "-tb", "4",
                       "--n_gpu_layers", "7", "-ins", "--numa", "--memory-f32", "-mg", "0", "-ts", "3,1"])
    assert o.no_effect == ("-ngl 99", "--mlock", "--no-mmap", "-tb 4", "--n-gpu-layers 7", "--numa",
                           "--memory-f32", "-mg 0", "-ts 3,1")
    assert (o.n_predict, o.instruct, o.threads) == (5, True, 1)          # nothing else changed
    assert "GPU" in no_effect_reason("-ngl 99") and "float32" in no_effect_reason("--memory-f32")
    assert parse_options(["-m", "m.gguf"]).no_effect == ()


def test_rope_overrides():
    assert (parse_options([]).rope_freq_base, parse_options([]).rope_freq_scale) == (None, None)
    o = parse_options(["--rope-freq-base", "1e6", "--rope-freq-scale", "0.5"])
    assert (o.rope_freq_base, o.rope_freq_scale) == (1e6, 0.5)
    assert parse_options(["--rope-scale", "4"]).rope_freq_scale == 0.25    # llama.cpp: 1 / --rope-scale
