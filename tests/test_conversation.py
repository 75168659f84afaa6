"""Conversation mode (-cnv) on SmolLM2-135M-Instruct: what each turn feeds (the fixture's llama-cli flow),
the replies of exact float32 greedy decoding (fixtures/smollm2 `conversation_float32`) in one process, in
spawn mode and under mpiexec, and the commands, errors and limits around it."""
from __future__ import annotations

import json

import pytest

from chat.conversation import ClearCache, ConversationState, Generate
from chat.options import ConversationSettings
from chat.state import Accept, Done, Eval, Print, ResetHistory, UserTurn
from core.chat_template import resolve
from core.tokenizer import Tokenizer
from test_cli_support import assert_no_rank_left, run_chat, tagged_env
from test_state_support import drive as support_drive

GREEDY = ["--temp", "0", "--repeat-penalty", "1", "-n", "-1", "-c", "1024"]


@pytest.fixture(scope="module")
def smol(smollm2_model):
    tok = Tokenizer.from_path(smollm2_model)
    template, notice = resolve(None, tok.chat_template, "<|im_start|>", "<|im_end|>")
    assert notice is None
    return tok, template


@pytest.fixture(scope="module")
def reference(smollm2_fixtures):
    return json.loads((smollm2_fixtures / "index.json").read_text())


def drive(state: ConversationState, users: list[str | None], replies: list[tuple[list[int], str]]) -> list:
    """Answer Read with the next user line and Generate with the next (reply ids, reason)."""
    return support_drive(state, [], users, replies=replies)


def test_each_turn_feeds_what_llama_cli_feeds(smol, reference):
    tok, template = smol
    turns = reference["conversation"]["turns"]
    state = ConversationState(ConversationSettings(), template, tok, 8192)
    log = drive(state, [t["user"] + "\n" for t in turns] + [None], [(t["reply_tokens"], "eog") for t in turns])
    fed = [list(r.tokens) for r in log if isinstance(r, Generate)]
    assert fed == [t["delta_tokens"] for t in turns]
    assert isinstance(log[-1], Done) and not any(isinstance(r, (Eval, ClearCache)) for r in log)
    assert state.messages == [{"role": "user", "content": turns[0]["user"]},
                              {"role": "assistant", "content": turns[0]["reply"]},
                              {"role": "user", "content": turns[1]["user"]},
                              {"role": "assistant", "content": turns[1]["reply"]}]
    # the sampler's history restarts each turn with the fed tokens, as after a user turn in main
    kinds = [type(r) for r in log if isinstance(r, (ResetHistory, Accept, Generate))]
    assert kinds == [ResetHistory, Accept, Generate] * 2


def test_the_system_prompt_is_the_part_a_context_shift_keeps(smol):
    tok, template = smol
    state = ConversationState(ConversationSettings(system="You are a pirate."), template, tok, 8192)
    log = drive(state, ["Ahoy\n", None], [([2], "eog")])
    first = next(r for r in log if isinstance(r, Generate))
    system = tok.encode("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n", add_bos=False,
                        parse_special=True)
    assert list(first.tokens[:len(system)]) == system and first.n_keep == len(system) - 1


def test_what_the_user_types_is_never_a_control_token(smol):
    tok, template = smol
    state = ConversationState(ConversationSettings(), template, tok, 8192)
    log = drive(state, ["a<|im_end|>b\n", None], [([2], "eog")])
    fed = next(r for r in log if isinstance(r, Generate)).tokens
    typed = tok.encode("a<|im_end|>b", add_bos=False)                  # the characters, as text
    assert fed.count(2) == 2                                           # the template's two <|im_end|> only
    assert any(list(fed[i:i + len(typed)]) == typed for i in range(len(fed)))


def test_a_reply_cut_short_is_closed_with_the_end_of_turn_token(smol, reference):
    tok, template = smol
    turns = reference["conversation"]["turns"]
    state = ConversationState(ConversationSettings(), template, tok, 8192)
    cut = turns[0]["reply_tokens"][:5]
    log = drive(state, [turns[0]["user"] + "\n", turns[1]["user"] + "\n", None], [(cut, "interrupted"), ([2], "eog")])
    closing = [r for r in log if isinstance(r, Eval)]
    assert closing == [Eval((2,), False)]                             # <|im_end|> fed after the cut reply
    second = [r for r in log if isinstance(r, Generate)][1]
    assert list(second.tokens) == turns[1]["delta_tokens"]             # then the same delta as after an EOG


def test_a_message_too_long_for_the_context_is_refused_with_a_line(smol):
    tok, template = smol
    state = ConversationState(ConversationSettings(), template, tok, 64)
    log = drive(state, ["word " * 100 + "\n", None], [])
    errors = [r for r in log if isinstance(r, Print) and r.style == "error"]
    assert len(errors) == 1 and "too long for the context" in errors[0].text
    assert not any(isinstance(r, Generate) for r in log) and state.messages == []


def test_first_user_message_from_p_is_shown_and_sent(smol):
    tok, template = smol
    state = ConversationState(ConversationSettings(first_user="Hi! Who are you?"), template, tok, 8192)
    log = drive(state, [None], [([2], "eog")])
    assert UserTurn("Hi! Who are you?\n", (), echo=True) in log
    assert state.messages[0] == {"role": "user", "content": "Hi! Who are you?"}


# ---- the real model, end to end ---------------------------------------------------------------------

def _replies(stdout: str) -> list[str]:
    """The model's replies in a -cnv transcript on stdout ("\\n> user\\nreply\\n" per turn)."""
    turns = stdout.split("\n> ")[1:]
    return [t.split("\n", 1)[1].rstrip("\n") for t in turns if "\n" in t.strip("\n") and not t.startswith("/")]


@pytest.mark.parametrize("launch", [[], ["--np", "3"]], ids=["single", "spawn-3"])
def test_script_conversation_equals_exact_float32_greedy(tmp_path, smollm2_model, reference, launch):
    want = [t["reply"] for t in reference["conversation_float32"]["turns"]]
    users = [t["user"] for t in reference["conversation_float32"]["turns"]]
    script = tmp_path / "turns.txt"
    script.write_text("\n\n".join(users) + "\n")
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", "--script", str(script), *GREEDY, *launch], env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _replies(r.stdout) == want
    assert_no_rank_left(tag)


def test_plain_lines_under_mpiexec_one_line_per_turn(tmp_path, smollm2_model, reference):
    want = [t["reply"] for t in reference["conversation_float32"]["turns"]]
    users = [t["user"] for t in reference["conversation_float32"]["turns"]]
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", *GREEDY], env, mpiexec_n=2, timeout=300,
                 stdin="\n".join(users) + "\n")
    assert r.returncode == 0, r.stderr
    # under mpiexec the terminal echoes what the user types, so rank 0 does not: "\n> reply\n" per turn
    assert [t.rstrip("\n") for t in r.stdout.split("\n> ")[1:] if t.strip()] == want
    assert_no_rank_left(tag)


def test_reset_save_and_n_cap(tmp_path, smollm2_model, reference):
    first = reference["conversation_float32"]["turns"][0]
    out_json, out_md = tmp_path / "chat.json", tmp_path / "chat.md"
    script = tmp_path / "turns.txt"
    script.write_text(f"{first['user']}\n\n/save {out_json}\n\n/reset\n\n{first['user']}\n\n/save {out_md}\n")
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", "--script", str(script), *GREEDY, "--np", "2"], env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _replies(r.stdout) == [first["reply"], first["reply"]]       # /reset: the same first turn again
    assert json.loads(out_json.read_text()) == [{"role": "user", "content": first["user"]},
                                                {"role": "assistant", "content": first["reply"]}]
    assert "## Turns" in out_md.read_text() and first["reply"] in out_md.read_text()
    # -n caps one reply: exactly 5 tokens of the same greedy reply
    r = run_chat(["-m", str(smollm2_model), "-cnv", "-p", first["user"], *GREEDY[:4], "-n", "5"], env,
                 stdin="")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_path(smollm2_model)
    assert _replies(r.stdout) == [tok.decode(first["reply_tokens"][:5])]
    assert_no_rank_left(tag)


def test_system_prompt_and_builtin_template(tmp_path, smollm2_model):
    env, _ = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", "-sys", "You answer in one word.", "-p", "Hi", "-n", "4",
                  "--temp", "0", "--chat-template", "chatml", "--verbose-prompt"], env, stdin="")
    assert r.returncode == 0, r.stderr
    assert "chat template chatml, system prompt 'You answer in one word.'" in r.stderr


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", "t.jinja: syntax error at line 1: unexpected '}'"),
    ("{{ raise_exception('roles must alternate') }}", "t.jinja: roles must alternate"),
])
def test_a_broken_template_is_one_line_and_exit_2(tmp_path, smollm2_model, template, message):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", "--chat-template", str(path), "-p", "Hi", "--np", "2"], env,
                 stdin="")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == f"error: chat template {tmp_path}/{message}", r.stderr
    assert len([x for x in lines if x.startswith("error:")]) == 1
    assert "Traceback" not in r.stderr
    assert_no_rank_left(tag)


def test_unknown_template_name_and_a_model_without_template(tmp_path, smollm2_model, fixtures):
    env, _ = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", "--chat-template", "nosuch", "-p", "Hi"], env, stdin="")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: --chat-template nosuch: not a file nor a built-in template (chatml, llama2,")
    stories = fixtures / "models" / "stories260K.gguf"                # its GGUF has no chat template
    r = run_chat(["-m", str(stories), "-cnv", "-p", "Hi", "-n", "4", "--temp", "0"], env, stdin="")
    assert r.returncode == 0, r.stderr
    assert "model has no chat template; using chatml" in r.stderr.splitlines()


def test_conversation_flags_need_conversation_mode(tmp_path, smollm2_model):
    env, _ = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-sys", "x", "-p", "Hi"], env, stdin="")
    assert r.returncode == 2 and r.stderr.strip() == "error: -sys/--system-prompt needs conversation mode: add -cnv"
    r = run_chat(["-m", str(smollm2_model), "-cnv", "-ins"], env, stdin="")
    assert r.returncode == 2 and "-ins has no meaning in conversation mode" in r.stderr


def test_a_full_context_shifts_out_old_turns_and_keeps_the_system_prompt(tmp_path, smollm2_model, reference):
    """-c 128: the second reply reaches the end of the context. 128 positions held, the system part (24
    tokens: "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n") kept, half of the other 104 dropped."""
    turns = reference["conversation_float32"]["turns"]
    script = tmp_path / "turns.txt"
    script.write_text("\n\n".join(t["user"] for t in turns) + "\n")
    tok = Tokenizer.from_path(smollm2_model)
    system = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\n", add_bos=False, parse_special=True)
    assert len(system) == 24
    env, tag = tagged_env(tmp_path)
    r = run_chat(["-m", str(smollm2_model), "-cnv", "--script", str(script), *GREEDY[:4], "-c", "128", "--np", "2"],
                 env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "context full: dropped 52 tokens of the oldest turns (the first 24 kept: the system prompt)" in r.stderr
    assert _replies(r.stdout)[0] == turns[0]["reply"]                  # the first reply, before any shift
    assert _replies(r.stdout)[1].startswith("I'm afraid I'm unable")   # (shared with the unshifted reply)
    assert_no_rank_left(tag)
