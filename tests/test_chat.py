"""Chat templates rendered as transformers renders them, and conversations of several turns."""

from __future__ import annotations

import pytest

from streamer.errors import ConfigError
from streamer.tokenizer import TokenizerSpec
from tests.models import train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "Where is 東京?"},
    {"role": "assistant", "content": "In Japan."},
    {"role": "tool", "content": "ignored after the break"},
    {"role": "user", "content": "And café?"},
]
TEMPLATES = {
    "loop controls": "{% for m in messages %}{% if m.role == 'tool' %}{% break %}{% endif %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}<{{ m.role }}>{{ m.content }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    "strftime_now": "Today is {{ strftime_now('%Y-%m-%d') }}.\n{% for m in messages %}"
    "{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:",
    "tojson, non-ASCII": "{{ messages | tojson }}{{ bos_token }}{{ eos_token }}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_render_as_transformers_renders_them(name):
    import transformers

    template = TEMPLATES[name]
    tok = train_tokenizer()
    ours = TokenizerSpec(tok.to_str(), template, "<s>", "</s>").build()
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )
    text = theirs.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert ours.chat_messages(CONVERSATION) == ours.encode(text, add_special_tokens=False)
    if name == "tojson, non-ASCII":
        assert "東京" in text and "\\u" not in text


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\] needs a role"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\].content"),
        ([{"role": "user", "content": "x", "images": []}], "does not take: images"),
    ],
)
def test_a_bad_conversation_is_one_error_naming_the_message(messages, problem):
    tok = TokenizerSpec(train_tokenizer().to_str(), TEMPLATES["loop controls"]).build()
    with pytest.raises(ConfigError, match=problem):
        tok.chat_messages(messages)
