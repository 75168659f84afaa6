"""ChatState against llama.cpp main's rules (DESIGN.md §5), no terminal and no model.

The tokenizer is byte-level (tests/test_state_support.py), so every expected id list below is written
by hand from the text: BOS = 1, EOS = 2, byte b = 3 + b.
"""
from __future__ import annotations

import pytest

from chat.options import parse_options
from chat.state import (INSTRUCT_PREFIX, INSTRUCT_SUFFIX, Accept, Done, Eval, Print, Read,
                        ResetHistory, Sample, Shift, Show, UserTurn)
from core.errors import ContextOverflowError
from test_state_support import BOS, EOS, drive, evals, ids, kinds, make


def opts(*argv):
    return parse_options(["-m", "m.gguf", *argv])


X, Y, Z = ids("x")[0], ids("y")[0], ids("z")[0]


def test_non_interactive_prompt_then_n_tokens():
    log = drive(make(opts("-n", "3"), "ab"), [X, Y, Z], [])
    assert evals(log) == [[BOS] + ids("ab"), [X], [Y]]          # the last sampled token is not evaluated
    shows = [(list(r.tokens), r.style) for r in log if isinstance(r, Show)]
    assert shows == [([BOS] + ids("ab"), "prompt"), ([X], "output"), ([Y], "output"), ([Z], "output")]
    assert log[-1] == Done("n-predict")


def test_prompt_tokens_are_accepted_into_history():
    log = drive(make(opts("-n", "1"), "ab"), [X], [])
    accepted = [t for r in log if isinstance(r, Accept) for t in r.tokens]
    assert accepted == [BOS] + ids("ab") + [X]


def test_eos_non_interactive_prints_end_of_text_and_stops():
    log = drive(make(opts("-n", "10"), "ab"), [X, EOS, Y], [])
    assert evals(log) == [[BOS] + ids("ab"), [X]]
    assert Print(" [end of text]\n") in log
    assert log[-1] == Done("end-of-text")


def test_eos_interactive_injects_first_reverse_prompt_and_reads():
    state = make(opts("-i", "-r", "User:", "-r", "Bob:"), "ab")
    log = drive(state, [X, EOS], ["hi\n"])
    k = kinds(log)
    assert k.index("Read") > k.index("Sample")
    assert Show(tuple(ids("User:")), "prompt") in log                # the injected reverse prompt is shown
    # EOS itself is evaluated, then the reverse prompt and the user's line
    assert evals(log) == [[BOS] + ids("ab"), [X], [EOS], ids("User:") + ids("hi\n")]
    assert kinds(log)[-1] == "Sample"


def test_eos_interactive_without_reverse_prompt_gives_control_back():
    log = drive(make(opts("-i"), "ab"), [X, EOS], [None])
    i = log.index(Read())
    assert log[i - 1] == Print("\n")
    assert log[-1] == Done("eof")


def test_prompt_ending_in_reverse_prompt_hands_control_to_user_first():
    log = drive(make(opts("-i", "-r", "User:"), "Chat.\nUser:"), [X], ["hi\n"])
    k = kinds(log)
    assert k[:3] == ["Show", "Eval", "Read"]                      # no token sampled before the user speaks
    assert evals(log)[1] == ids("hi\n")


@pytest.mark.parametrize("said", ["User:", "Bob:"])
def test_two_reverse_prompts_either_stops(said):
    state = make(opts("-i", "-r", "User:", "-r", "Bob:"), "ab")
    log = drive(state, ids(said) + [X], [])
    assert isinstance(log[-1], Read)
    assert [r for r in log if isinstance(r, Sample)].__len__() == len(said)


def test_reverse_prompt_must_end_the_text_when_interactive():
    # token 300 is one piece "User: x": the reverse prompt is inside it, not at the end
    state = make(opts("-i", "-r", "User:"), "ab", extra={300: b"User: x"})
    log = drive(state, [300, Y], [])
    assert not any(isinstance(r, Read) for r in log)
    assert kinds(log)[-1] == "Sample"


def test_reverse_prompt_has_two_bytes_of_slack_when_not_interactive():
    state = make(opts("-n", "10", "-r", "User:"), "ab", extra={300: b"User: x", 301: b"User: xy"})
    assert drive(state, [300, Y], [])[-1] == Done("reverse-prompt")
    state = make(opts("-n", "3", "-r", "User:"), "ab", extra={300: b"User: x", 301: b"User: xy"})
    assert drive(state, [301, Y, Z], [])[-1] == Done("n-predict")   # 3 bytes after it: no match


def test_reverse_prompt_searched_in_last_32_tokens_only():
    state = make(opts("-i", "-r", "a" * 32, "-r", "b" * 33), "x")
    state.history = ids("x" + "a" * 32)
    assert state.found_reverse_prompt() is True                    # 32 one-byte tokens: inside the window
    state.history = ids("b" * 33)
    assert state.history_text() == b"b" * 32                       # the 33rd token is outside it
    assert state.found_reverse_prompt() is False
    state.history = ids("User:")
    assert make(opts("-i", "-r", "User:"), "x").found_reverse_prompt() is False   # history is per state


def test_instruct_wraps_each_turn_in_alpaca_strings_with_bos():
    state = make(opts("-ins"), "")
    log = drive(state, [], ["hi\n"])
    assert log.index(Print("\n> ")) + 1 == log.index(Read(instruct=True))
    pfx = [BOS] + ids("\n\n### Instruction:\n\n")
    sfx = ids("\n\n### Response:\n\n")
    assert evals(log) == [[BOS], pfx + ids("hi\n") + sfx]
    assert INSTRUCT_PREFIX == "\n\n### Instruction:\n\n" and INSTRUCT_SUFFIX == "\n\n### Response:\n\n"
    assert state.c.n_keep == 1                                     # --keep becomes the whole prompt
    assert state.reverse_prompts == ["### Instruction:\n\n"]


def test_instruct_after_eos_injects_reverse_prompt_instead_of_prefix():
    log = drive(make(opts("-ins"), ""), [X, EOS], ["hi\n", "yo\n"])
    sfx = ids("\n\n### Response:\n\n")
    assert evals(log)[-2:] == [[EOS], ids("### Instruction:\n\n") + ids("yo\n") + sfx]


def test_in_prefix_and_suffix_are_printed_and_tokenized_around_the_line():
    state = make(opts("--interactive-first", "--in-prefix", "U: ", "--in-suffix", "A:"), "ab",
                 input_prefix="U: ", input_suffix="A:")
    log = drive(state, [X], ["hi\n"])
    r = log.index(Read())
    assert log[r - 1] == Print("U: ") and log[r + 1] == Print("A:")
    assert evals(log)[1] == ids("U: ") + ids("hi\n") + ids("A:")
    turn = next(x for x in log if isinstance(x, UserTurn))
    assert turn.text == "hi\n" and list(turn.tokens) == ids("U: hi\nA:")


def test_in_prefix_bos_is_queued_even_for_an_empty_line():
    log = drive(make(opts("--interactive-first", "--in-prefix-bos"), "ab"), [], ["\n"])
    assert evals(log) == [[BOS] + ids("ab"), [BOS]]
    assert kinds(log)[-1] == "Sample"


def test_empty_line_hands_control_back_without_tokens():
    log = drive(make(opts("--interactive-first"), "ab"), [], ["\n"])
    k = kinds(log)
    assert k[k.index("Read"):] == ["Read", "ResetHistory", "Sample"]
    assert not any(isinstance(r, UserTurn) for r in log)


def test_user_text_is_tokenized_without_special_tokens():
    log = drive(make(opts("--interactive-first"), "ab"), [X], ["<s>\n"])
    assert evals(log)[1] == ids("<s>\n")                           # literal text, not BOS
    log = drive(make(opts("-p", "x"), "<s>a", ), [X], [])           # the prompt does parse them
    assert evals(log)[0] == [BOS, BOS] + ids("a")


def test_escapes_in_user_input_with_e():
    log = drive(make(opts("--interactive-first", "-e"), "a"), [X], ["x\\ny\n"])
    assert evals(log)[1] == ids("x\ny\n")
    log = drive(make(opts("--interactive-first"), "a"), [X], ["x\\ny\n"])
    assert evals(log)[1] == ids("x\\ny\n")


def test_user_tokens_count_against_n_predict():
    state = make(opts("--interactive-first", "-n", "5"), "ab")
    seen = []
    log = drive(state, [X, Y, Z], ["hij\n", "q\n"], on_request=lambda s, r: isinstance(r, Read) and seen.append(s.c.n_remain))
    # 5 - 4 user tokens = 1 sample, then control returns with the budget restored
    assert seen == [5, 5]
    first, second = [i for i, r in enumerate(log) if isinstance(r, Read)][:2]
    assert sum(isinstance(r, Sample) for r in log[first:second]) == 1


def test_user_line_longer_than_budget_returns_control_at_once():
    state = make(opts("--interactive-first", "-n", "3"), "ab")
    log = drive(state, [X], ["abcdefg\n", None])
    reads = [i for i, r in enumerate(log) if isinstance(r, Read)]
    assert len(reads) == 2 and not any(isinstance(r, Sample) for r in log[reads[0]:reads[1]])
    assert log[-1] == Done("eof")


def test_history_resets_after_each_user_turn():
    state = make(opts("--interactive-first"), "ab")
    log = drive(state, [X], ["hi\n"])
    r = log.index(Read())
    assert isinstance(log[r + 2], ResetHistory)                   # Read, UserTurn, ResetHistory
    accepts = [list(a.tokens) for a in log[r:] if isinstance(a, Accept)]
    assert accepts == [ids("hi\n"), [X]]
    assert state.history == ids("hi\n") + [X]


def test_context_shift_keeps_bos_plus_n_keep_and_discards_half():
    state = make(opts("-n", "20", "-c", "16"), "ab", n_ctx=16)
    log = drive(state, [X] * 20, [])
    shifts = [r for r in log if isinstance(r, Shift)]
    assert shifts == [Shift(1, 7)]                                 # n_past 16: n_left 15, discard 7
    assert state.c.n_past == 3 + 19 - 7 and state.c.n_shifts == 1
    state = make(opts("-n", "20", "--keep", "2"), "ab", n_ctx=16)
    log = drive(state, [X] * 20, [])
    assert [r for r in log if isinstance(r, Shift)] == [Shift(3, 6)]


def test_keep_minus_one_means_the_whole_prompt():
    state = make(opts("--keep", "-1"), "abcd")
    assert state.c.n_keep == 5


def test_n_predict_minus_two_stops_when_the_context_is_full():
    state = make(opts("-n", "-2"), "ab", n_ctx=16)
    log = drive(state, [X] * 40, [])
    assert log[-1] == Done("context-full")
    assert sum(isinstance(r, Sample) for r in log) == 14           # 3 prompt + 13 evaluated + 1 that did not fit
    assert not any(isinstance(r, Shift) for r in log)


def test_prompt_longer_than_n_ctx_minus_4_is_an_error():
    make(opts(), "abc", n_ctx=8)                                    # BOS + 3 = 4 tokens: fits
    with pytest.raises(ContextOverflowError, match=r"prompt is too long \(5 tokens, max 4"):
        make(opts(), "abcd", n_ctx=8)


def test_user_input_longer_than_the_context_is_cut_with_a_message():
    state = make(opts("--interactive-first"), "a", n_ctx=16)
    log = drive(state, [], ["abcdefghijklmnopqrst\n"])
    assert Print("<<input too long: skipped 9 tokens>>", "error") in log
    assert evals(log)[-1] == ids("abcdefghijkl")


def test_queued_input_is_evaluated_in_n_batch_chunks():
    log = drive(make(opts("-n", "1", "-b", "4"), "abcdefghi"), [X], [])
    assert evals(log) == [[BOS] + ids("abc"), ids("defg"), ids("hi")]
    assert [r.style for r in log if isinstance(r, Show)] == ["prompt", "prompt", "prompt", "output"]


def test_interrupt_while_generating_gives_the_prompt_back():
    calls = []

    def hook(state, req):
        if isinstance(req, Sample):
            calls.append(1)
            if len(calls) == 2:
                state.interrupt()
    log = drive(make(opts("-i"), "ab"), [X, Y, Z], [None], on_request=hook)
    k = kinds(log)
    assert k.count("Sample") == 2 and k[-2:] == ["Read", "Done"]


def test_interactive_n_predict_exhausted_returns_control():
    log = drive(make(opts("-i", "-n", "2"), "ab"), [X, Y, Z], [None])
    k = kinds(log)
    assert k.count("Sample") == 2 and "Read" in k


def test_input_that_cannot_fit_after_keeping_the_prompt_is_cut():
    # --keep -1 keeps all 11 prompt tokens of a 16-token context: nothing can be discarded
    state = make(opts("--interactive-first", "--keep", "-1"), "abcdefghij", n_ctx=16)
    log = drive(state, [], ["0123456789\n"])
    assert not any(isinstance(r, Shift) for r in log)
    assert Print("<<input too long: skipped 6 tokens>>", "error") in log
    assert evals(log)[-1] == ids("01234") and state.c.n_past == 16


def test_prefix_and_suffix_parse_special_tokens_but_user_text_does_not():
    state = make(opts("--interactive-first", "--in-prefix", "<s>U:", "--in-suffix", "</s>A:"), "a")
    log = drive(state, [], ["<s>\n"])
    assert evals(log)[-1] == [BOS] + ids("U:") + ids("<s>\n") + [EOS] + ids("A:")
