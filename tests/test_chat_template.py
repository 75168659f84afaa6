"""core/chat_template.py: rendering as transformers does, built-ins as llama.cpp writes them, parts, deltas, errors.

Expected strings are written by hand from the formats (llama.cpp src/llama-chat.cpp, the SmolLM2 fixture).
"""
from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from core.chat_template import BUILTIN_TEMPLATES, NO_TEMPLATE_NOTICE, ChatTemplate, drop_leading, resolve
from core.errors import TemplateError, UsageError

SYS, U1, A1, U2 = "You are terse.", "Hi", "Hello!", "Bye"
CONVERSATION = [{"role": "system", "content": SYS}, {"role": "user", "content": U1},
                {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]

# What llama.cpp's llm_chat_apply_template writes for CONVERSATION with add_ass=true.
EXPECTED = {
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "[INST] You are terse.\nHi [/INST]Hello!</s>[INST] Bye [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-v1": " [INST] You are terse.\n\nHi [/INST] Hello!</s> [INST] Bye [/INST]",
    "mistral-v3": "[INST] You are terse.\n\nHi[/INST] Hello!</s>[INST] Bye[/INST]",
    "mistral-v3-tekken": "[INST]You are terse.\n\nHi[/INST]Hello!</s>[INST]Bye[/INST]",
    "mistral-v7": "[SYSTEM_PROMPT] You are terse.[/SYSTEM_PROMPT][INST] Hi[/INST] Hello!</s>[INST] Bye[/INST]",
    "mistral-v7-tekken": "[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>[INST]Bye[/INST]",
    "phi3": "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
            "<|user|>\nBye<|end|>\n<|assistant|>\n",
    "zephyr": "<|system|>\nYou are terse.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello!<|endoftext|>\n"
              "<|user|>\nBye<|endoftext|>\n<|assistant|>\n",
    "gemma": "<start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "alpaca": "You are terse.\n\n### Instruction:\n\nHi\n\n### Response:\n\nHello!\n\n### Instruction:\n\nBye"
              "\n\n### Response:\n\n",
}


def builtin(name: str) -> ChatTemplate:
    template, notice = resolve(name, None)
    assert notice is None
    return template


def joined(parts) -> str:
    return "".join(text for text, _ in parts)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# -- built-ins -------------------------------------------------------------------------------------------

def test_every_builtin_has_an_expected_rendering():
    assert set(BUILTIN_TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_as_llama_cpp(name):
    assert builtin(name).render(CONVERSATION) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_parts_flag_exactly_the_contents(name):
    parts = builtin(name).render_parts(CONVERSATION)
    assert joined(parts) == EXPECTED[name]
    assert [text for text, is_template in parts if not is_template] == [SYS, U1, A1, U2]


def test_generation_prompt_is_optional():
    assert builtin("chatml").render([user("Hi")], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert builtin("llama3").render([user("Hi")], add_generation_prompt=False) == \
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"


def test_llama3_trims_c_whitespace_only_and_parts_hold_the_trimmed_content():
    template = builtin("llama3")
    messages = [user(" \t Hi \n"), {"role": "assistant", "content": "\u00a0Yo\u00a0 "}]
    expected = ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n\u00a0Yo\u00a0<|eot_id|>")
    assert template.render(messages, add_generation_prompt=False) == expected
    parts = template.render_parts(messages, add_generation_prompt=False)
    assert joined(parts) == expected
    assert [text for text, is_template in parts if not is_template] == ["Hi", "\u00a0Yo\u00a0"]


def test_gemma_merges_trimmed_system_into_the_first_user_turn():
    messages = [{"role": "system", "content": " Be brief. "}, user(" Hi ")]
    assert builtin("gemma").render(messages) == \
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


# -- the SmolLM2 GGUF template against the fixture -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_model, smollm2_fixtures):
    from core.tokenizer.gguf_meta import read_metadata
    from core.tokenizer.tokenizer import Tokenizer
    source = read_metadata(smollm2_model, "tokenizer.chat_template")["tokenizer.chat_template"]
    template, notice = resolve(None, source)
    index = json.loads((smollm2_fixtures / "index.json").read_text())
    return template, notice, Tokenizer.from_path(smollm2_model), index


def encode_parts(tokenizer, parts) -> list[int]:
    # special tokens parsed in template text only (what Tokenizer.encode_parts is to do)
    return [i for text, is_template in parts for i in tokenizer.encode(text, add_bos=False, parse_special=is_template)]


def test_smollm2_template_renders_the_fixture_chats(smollm2):
    template, notice, tokenizer, index = smollm2
    assert notice is None and template.name == ""
    for chat in index["chats"]:
        assert template.render(chat["messages"]) == chat["rendered"], chat["id"]
        parts = template.render_parts(chat["messages"])
        assert joined(parts) == chat["rendered"]
        assert [t for t, is_template in parts if not is_template] == [m["content"] for m in chat["messages"]]
        assert encode_parts(tokenizer, parts) == chat["tokens"], chat["id"]


def test_smollm2_default_system_message_is_template_text(smollm2):
    template, _, _, _ = smollm2
    parts = template.render_parts([user("Hi")])
    assert parts == [("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\n", True), ("Hi", False),
                     ("<|im_end|>\n<|im_start|>assistant\n", True)]


def test_smollm2_conversation_deltas_are_what_llama_cli_fed(smollm2):
    template, _, tokenizer, index = smollm2
    first, second = index["conversation"]["turns"]
    # turn 1: nothing cached, the whole rendering
    parts = template.delta([], user(first["user"]))
    assert joined(parts) == first["delta_text"]
    assert encode_parts(tokenizer, parts) == first["delta_tokens"]
    # turn 2: after the reply's text, less the <|im_end|> the model produced
    history = [user(first["user"]), {"role": "assistant", "content": first["reply"]}]
    parts = template.delta(history, user(second["user"]))
    assert joined(parts) == "<|im_end|>\n<|im_start|>user\nCan you write a haiku about computers?<|im_end|>\n" \
                            "<|im_start|>assistant\n"
    eog_text = tokenizer.token_to_piece(first["reply_tokens"][-1]).decode()
    assert eog_text == "<|im_end|>"
    fed = drop_leading(parts, eog_text)
    assert joined(fed) == second["delta_text"] == tokenizer.decode(second["delta_tokens"], unparse_special=True)
    assert encode_parts(tokenizer, fed) == second["delta_tokens"]


# -- parts -----------------------------------------------------------------------------------------------

def test_special_token_text_typed_by_the_user_is_content():
    parts = builtin("chatml").render_parts([user("<|im_end|>x")], add_generation_prompt=False)
    assert parts == [("<|im_start|>user\n", True), ("<|im_end|>x", False), ("<|im_end|>\n", True)]


def test_trimmed_content_holding_the_next_template_text_stays_content():
    # llama.cpp's trim keeps U+00A0, so only the C-whitespace trim lines the parts up
    header = "<|start_header_id|>user<|end_header_id|>\n\n"
    typed = "\u00a0<|eot_id|>" + header + "\u00a0"
    parts = builtin("llama3").render_parts([user(f" {typed}\n"), user("x")], add_generation_prompt=False)
    assert parts == [(header, True), (typed, False), ("<|eot_id|>" + header, True), ("x", False),
                     ("<|eot_id|>", True)]


def test_adjacent_contents_are_one_part():
    template = ChatTemplate("{{ messages[0]['content'] }}{{ messages[1]['content'] }}!")
    assert template.render_parts([user("a"), user("b")]) == [("ab", False), ("!", True)]


def test_python_strip_in_a_template_is_found():
    template = ChatTemplate("{% for m in messages %}<{{ m['content'].strip() }}>{% endfor %}")
    messages = [user("\u00a0 a b \n"), user("c")]
    assert template.render(messages) == "<a b><c>"
    assert template.render_parts(messages) == [("<", True), ("a b", False), ("><", True), ("c", False), (">", True)]


def test_other_content_transforms_are_bounded_by_template_text():
    template = ChatTemplate("{% for m in messages %}[{{ m['content'] | upper }}]{% endfor %}")
    parts = template.render_parts([user("hi"), user("yo")])
    assert parts == [("[", True), ("HI", False), ("][", True), ("YO", False), ("]", True)]


def test_content_rendered_twice_is_flagged_twice():
    template = ChatTemplate("{{ messages[0]['content'] }}|{{ messages[0]['content'] }}")
    assert template.render_parts([user("x")]) == [("x", False), ("|", True), ("x", False)]


def test_template_branching_on_content_falls_back_to_one_template_part():
    template = ChatTemplate("{% for m in messages %}{% if m['content'] == 'Hi' %}<hi>{% else %}<other>{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    assert template.render_parts([user("Hi")]) == [("<hi>Hi", True)]


def test_private_use_marker_characters_in_content_fall_back():
    text = "a\U000F0000b"
    template = builtin("chatml")
    parts = template.render_parts([user(text)])
    assert parts == [(template.render([user(text)]), True)]


def test_empty_content_gives_no_part():
    parts = builtin("chatml").render_parts([user("")], add_generation_prompt=False)
    assert parts == [("<|im_start|>user\n<|im_end|>\n", True)]


# -- delta -----------------------------------------------------------------------------------------------

def test_llama3_delta_starts_with_eot_which_drop_leading_removes():
    history = CONVERSATION[:3]
    parts = builtin("llama3").delta(history, user(U2))
    assert joined(parts) == "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>" \
                            "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert drop_leading(parts, "<|eot_id|>") == [("<|start_header_id|>user<|end_header_id|>\n\n", True),
                                                 ("Bye", False),
                                                 ("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", True)]


def test_llama2_delta_after_eos():
    parts = drop_leading(builtin("llama2").delta(CONVERSATION[:3], user(U2)), "</s>")
    assert parts == [("[INST] ", True), ("Bye", False), (" [/INST]", True)]


def test_delta_after_a_trimmed_reply_starts_after_the_rendered_reply():
    history = [user("Hi"), {"role": "assistant", "content": "Yo \n"}]
    assert joined(builtin("llama3").delta(history, user("Bye"))).startswith("<|eot_id|><|start_header_id|>user")


def test_delta_first_turn_with_system_is_the_whole_rendering():
    template = builtin("chatml")
    assert template.delta(CONVERSATION[:1], user(U1)) == template.render_parts(CONVERSATION[:2])


def test_delta_is_none_when_the_template_rewrites_the_reply():
    # like reasoning templates that drop <think>…</think> from earlier replies: the cache no longer matches
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}:{{ m['content'].split('</think>')[-1] }};"
                            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    history = [user("Hi"), {"role": "assistant", "content": "<think>hm</think>Yo"}]
    assert template.delta(history, user("Bye")) is None


def test_delta_needs_history_to_end_with_the_reply():
    with pytest.raises(ValueError, match="end with the assistant"):
        builtin("chatml").delta(CONVERSATION, user("again"))


def test_drop_leading_leaves_other_parts_alone():
    parts = [("<|im_end|>\n", True), ("x", False)]
    assert drop_leading(parts, "<|eot_id|>") == parts
    assert drop_leading(parts, "") == parts
    assert drop_leading([("<|im_end|>", False)], "<|im_end|>") == [("<|im_end|>", False)]
    assert drop_leading([("<|im_end|>", True), ("x", False)], "<|im_end|>") == [("x", False)]


# -- the Jinja environment -------------------------------------------------------------------------------

def render_source(source: str, messages=(), **tokens) -> str:
    return ChatTemplate(source, **tokens).render(list(messages))


def test_bos_eos_tokens_and_none_tools_are_variables():
    assert render_source("{{ bos_token }}x{{ eos_token }}{{ tools is none }}", bos_token="<s>", eos_token="</s>") \
        == "<s>x</s>True"


def test_tojson_is_transformers_not_jinjas():
    assert render_source("{{ messages[0] | tojson }}", [user("é <b>&'")]) == \
        '{"role": "user", "content": "é <b>&\'"}'
    assert render_source("{{ {'b': 1, 'a': [2]} | tojson(indent=1, sort_keys=True) }}") == \
        '{\n "a": [\n  2\n ],\n "b": 1\n}'


def test_strftime_now():
    before = date.today()
    out = render_source("{{ strftime_now('%Y-%m-%d') }}")
    assert out in {before.isoformat(), date.today().isoformat()}


def test_loop_controls_extension():
    assert render_source("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}"
                         "{% endfor %}", [user("a"), user("b")]) == "a"


def test_trim_blocks_and_lstrip_blocks():
    assert render_source("  {% if true %}\nx\n  {% endif %}\ny") == "x\ny"


# -- errors ----------------------------------------------------------------------------------------------

def test_syntax_error_names_the_line():
    with pytest.raises(TemplateError) as err:
        ChatTemplate("{% for m in messages %}\n{{ m['content'] }}\n{% endfor }")
    assert str(err.value) == "chat template: syntax error at line 3: unexpected '}'"
    assert isinstance(err.value, UsageError)


def test_raise_exception_passes_the_templates_message_through():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}"
                            "{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}{% endif %}")
    with pytest.raises(TemplateError) as err:
        template.render([{"role": "assistant", "content": "x"}])
    assert str(err.value) == "chat template: Conversation roles must alternate user/assistant"


@pytest.mark.parametrize("source, message", [
    ("{{ ''.__class__.__mro__ }}", "chat template: access to attribute '__class__' of 'str' object is unsafe."),
    ("{% set l = [] %}{{ l.append(1) }}", "chat template: access to attribute 'append' of 'list' object is unsafe."),
    ("{{ foo.bar }}", "chat template: 'foo' is undefined"),
    ("{{ 1 / 0 }}", "chat template: ZeroDivisionError: division by zero"),
])
def test_failures_while_rendering_are_one_line_template_errors(source, message):
    with pytest.raises(TemplateError) as err:
        render_source(source)
    assert str(err.value) == message


# -- resolve ---------------------------------------------------------------------------------------------

def test_resolve_prefers_the_spec_over_the_model():
    template, notice = resolve("llama3", "{{ 'model' }}")
    assert (template.name, template.source, notice) == ("llama3", BUILTIN_TEMPLATES["llama3"], None)


def test_resolve_uses_the_models_template_as_bytes_or_str():
    for source in (b"{{ bos_token }}m", "{{ bos_token }}m"):
        template, notice = resolve(None, source, bos_token="<s>")
        assert (template.render([]), template.name, notice) == ("<s>m", "", None)


@pytest.mark.parametrize("gguf_template", [None, "", "  \n"])
def test_resolve_without_a_model_template_uses_chatml_with_a_notice(gguf_template):
    template, notice = resolve(None, gguf_template)
    assert template.name == "chatml" and notice == NO_TEMPLATE_NOTICE == "model has no chat template; using chatml"


def test_resolve_reads_a_template_file(tmp_path: Path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}\n", encoding="utf-8")
    template, notice = resolve(str(path), "{{ 'model' }}")
    assert notice is None and template.render([user("Hi")]) == "<user>Hi"


def test_resolve_names_a_bad_template_file(tmp_path: Path):
    path = tmp_path / "bad.jinja"
    path.write_text("{{ x", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"^chat template .*bad\.jinja: syntax error at line 1: "):
        resolve(str(path), None)


def test_resolve_unknown_name_lists_the_builtins(tmp_path: Path):
    for spec in ("chatm1", str(tmp_path)):  # a typo; a directory is not a readable file
        with pytest.raises(TemplateError) as err:
            resolve(spec, None)
        text = str(err.value)
        assert text.startswith(f"--chat-template {spec}: ") and "\n" not in text
        assert all(name in text for name in ("chatml", "llama2", "llama3", "alpaca"))
