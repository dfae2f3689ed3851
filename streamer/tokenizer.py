"""Text to token ids and back, with the model's chat template.

Built on the `tokenizers` library. A Hugging Face directory brings its `tokenizer.json`; a GGUF
file only lists its tokens and merges in metadata, so we rebuild the byte-level BPE from them the
way llama.cpp reads them (including the pre-tokenizer its `tokenizer.ggml.pre` names). A converted
model stores the tokenizer as `tokenizer.json` + `tokenizer_config.json`, as an HF dir does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from streamer.config import ModelConfig
from streamer.errors import ConfigError, ModelFormatError

# llama.cpp's pre-tokenizer regexes, by the name a GGUF gives in tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class TokenizerSpec:
    """A tokenizer plus what generation needs to know about it."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def build(self) -> Tokenizer:
        return Tokenizer(self)

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(self.tokenizer_json)
        cfg = {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))

    @classmethod
    def from_hf_dir(cls, directory: Path, cfg: ModelConfig | None = None) -> TokenizerSpec | None:
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        tc: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            try:
                tc = json.loads((directory / "tokenizer_config.json").read_text())
            except ValueError as e:
                raise ModelFormatError(
                    f"{directory}/tokenizer_config.json: bad JSON ({e})"
                ) from None
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = directory / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()

        def token(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v

        return cls(
            path.read_text(), template, token(tc.get("bos_token")), token(tc.get("eos_token"))
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> TokenizerSpec:

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelFormatError(
                f"GGUF tokenizer type {kind!r} is not supported (only 'gpt2' "
                "byte-level BPE); convert the Hugging Face directory instead"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        tok = HFTokenizer(
            BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in _GGUF_SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif pre == "smollm":  # digits one by one, then GPT-2's split (llama.cpp's "smollm")
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == _CONTROL
            ]
        )
        tok.add_tokens(
            [
                AddedToken(t, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == _USER_DEFINED
            ]
        )

        def name(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos = name("bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, int(meta["tokenizer.ggml.bos_token_id"]))],
            )
        return cls(tok.to_str(), meta.get("tokenizer.chat_template"), bos, name("eos_token_id"))


class Tokenizer:
    """Text to ids and back (`tokenizers`), the chat template, and the ids that end a reply."""

    def __init__(self, spec: TokenizerSpec) -> None:

        self.spec = spec
        try:
            self.tok = HFTokenizer.from_str(spec.tokenizer_json)
        except Exception as e:
            raise ModelFormatError(f"tokenizer.json cannot be read ({e})") from None

    def stop_ids(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The ids that end a reply: the model config's and the tokenizer's end-of-sequence."""
        eos = set(cfg.eos_token_ids)
        if (eos_id := self.token_id(self.spec.eos_token)) is not None:
            eos.add(eos_id)
        return tuple(sorted(eos))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat(self, prompt: str, system: str | None = None) -> list[int]:
        """Token ids of one user turn wrapped in the model's chat template, ready for the reply."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.chat_messages(messages)

    def chat_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (messages with a role and a content, several turns)
        wrapped in the model's chat template, ready for the assistant's reply. The template is
        rendered as transformers' `apply_chat_template` renders it (see `template_environment`)."""
        if not self.spec.chat_template:
            raise ModelFormatError("this model has no chat template; drop --chat")
        check_messages(messages)
        try:
            text = (
                template_environment()
                .from_string(self.spec.chat_template)
                .render(
                    messages=messages,
                    add_generation_prompt=True,
                    bos_token=self.spec.bos_token or "",
                    eos_token=self.spec.eos_token or "",
                )
            )
        except TemplateError as e:
            raise ModelFormatError(f"the model's chat template failed: {e}") from None
        # The template writes any BOS itself, as transformers' apply_chat_template assumes.
        return self.encode(text, add_special_tokens=False)


ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: object) -> None:
    """ConfigError naming the message at fault unless `messages` is a non-empty list of
    {"role": one of ROLES, "content": text}."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConfigError(f"messages[{i}] needs a role, one of {', '.join(ROLES)}", "messages")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}].content must be a string", "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ConfigError(
                f"messages[{i}] has fields this server does not take: {', '.join(sorted(extra))}",
                "messages",
            )


def template_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (`_compile_jinja_template`): loop
    controls (`{% break %}`, `{% continue %}`), `raise_exception`, `strftime_now`, and `tojson`
    keeping non-ASCII text as it is."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class TextStream:
    """A reply's text as it grows, token by token: `push(ids)` gives the new text since the last
    call, holding back a partial UTF-8 character until its last byte arrives. With `stop`
    strings, the text ends before the first one it contains (`stopped` is then set), and a tail
    that may be the start of one is held back until the next tokens say."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] | list[str] = ()) -> None:
        self.tokenizer, self.shown, self.stop, self.stopped = tokenizer, "", tuple(stop), False

    def _cut(self, text: str, hold: bool) -> str:
        at = [i for s in self.stop if (i := text.find(s)) >= 0]
        if at:
            self.stopped = True
            return text[: min(at)]
        if hold:
            tail = [k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])]
            return text[: len(text) - max(tail, default=0)]
        return text

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            return ""
        text = self._cut(text, hold=True)
        if not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown) :], text
        return delta

    def finish(self, ids: list[int]) -> str:
        """What is left to show once the reply is complete."""
        if self.stopped:
            return ""
        text = self._cut(self.tokenizer.decode(ids), hold=False)
        delta = text[len(self.shown) :] if text.startswith(self.shown) else ""
        self.shown = text
        return delta
