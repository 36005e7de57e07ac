"""Chat templates chosen for a run, and text rows rendered as chat (--text-as-chat).

By default (TRL's behaviour) text rows are tokenized as plain text and only conversational
rows (lists of messages) go through the tokenizer's chat template. Two options change that:

  --chat-template FILE  a jinja file that becomes `tokenizer.chat_template` for the run (as
                        TRL's `chat_template_path`); it is checked here, once, by parsing it
                        and rendering a short conversation, and a trainer saves it with the
                        tokenizer in OUTPUT/final, so the artifact renders the same way.
  --text-as-chat        text rows become messages before tokenizing: a prompt string is one
                        user turn, or the turns of an HH transcript
                        ("\\n\\nHuman: ...\\n\\nAssistant: ..."), and each completion string is
                        one assistant turn. Whitespace around each turn is dropped and so is
                        a trailing EOS (the template lays out turns and writes its own end of
                        turn), so a text row gives the ids of the equivalent messages row.
                        Rows with an empty prompt (SFT's `text` rows: language-model data with
                        no turns) stay plain text.

The setting travels on the tokenizer (`TEXT_AS_CHAT`): every path that tokenizes rows (each
trainer, data check, score, generation of prompts) already receives the tokenizer, so one
object carries the template and the choice of how text rows meet it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.config import Section, option
from prefalign.errors import ConfigError, DataError

TEXT_AS_CHAT = "prefalign_text_as_chat"
TEMPLATE_PATH = "prefalign_chat_template_path"
FLAG_HINT = "pass --chat-template FILE (a jinja chat template)"
# Rendered once when a template is loaded: a template that cannot lay out a plain
# user/assistant exchange fails here, naming its file, instead of on some row mid-run.
_PROBE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def read_chat_template(path: str | Path) -> str:
    """The text of a jinja chat template file; ConfigError naming the file if unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"--chat-template {path}: cannot read it ({reason})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty; give a jinja chat "
                          "template")
    return text


def set_chat_template(tokenizer: Any, path: str | Path) -> None:
    """Make the template in `path` the tokenizer's, after checking that it parses and renders
    a user/assistant exchange (with and without the generation prompt)."""
    from jinja2 import TemplateError

    template = read_chat_template(path)
    try:
        for messages, gen in ((_PROBE[:1], True), (_PROBE, False)):
            tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                          add_generation_prompt=gen)
    except TemplateError as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        kind = "does not parse" if type(exc).__name__ == "TemplateSyntaxError" else (
            "raises when rendering a user/assistant exchange")
        message = str(getattr(exc, "message", None) or exc).splitlines()[0]
        raise ConfigError(f"--chat-template {path}: the template {kind}{line}: "
                          f"{message}") from None
    except Exception as exc:  # jinja runtime errors (TypeError, ...) in the template's code
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"--chat-template {path}: the template raises when rendering a "
                          f"user/assistant exchange: {type(exc).__name__}: {first}") from None
    tokenizer.chat_template = template
    setattr(tokenizer, TEMPLATE_PATH, str(path))


def configure_tokenizer(tokenizer: Any, chat_template: str | None = None,
                        text_as_chat: bool = False, name: str = "the model") -> Any:
    """Apply --chat-template and --text-as-chat to a loaded tokenizer; returns it."""
    if chat_template:
        set_chat_template(tokenizer, chat_template)
    if text_as_chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--text-as-chat needs a chat template, and the tokenizer of {name} "
                          f"has none; {FLAG_HINT}")
    setattr(tokenizer, TEXT_AS_CHAT, bool(text_as_chat))
    return tokenizer


def text_as_chat(tokenizer: Any) -> bool:
    """Whether text rows are rendered with the chat template (configure_tokenizer)."""
    return bool(getattr(tokenizer, TEXT_AS_CHAT, False))


def tokens_line(tokenizer: Any) -> str:
    """The one line a run prints at start: how rows become tokens."""
    path = getattr(tokenizer, TEMPLATE_PATH, None)
    source = f"the chat template from {path}" if path else "the tokenizer's chat template"
    if text_as_chat(tokenizer):
        return f"tokens: text rows rendered as chat with {source}"
    if path:
        return (f"tokens: chat template from {path} (conversational rows); text rows as "
                "plain text (--text-as-chat renders them with it)")
    return ("tokens: text rows as plain text (the default; --text-as-chat renders them with "
            "the chat template)")


def require_chat_template(tokenizer: Any, origin: str) -> None:
    """DataError naming the fix when a conversational row meets a tokenizer without one."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{origin}: the row is conversational but the tokenizer has no chat "
                        f"template; {FLAG_HINT}")


def hh_to_messages(text: str, origin: str = "") -> list[dict]:
    """An HH transcript -> user/assistant messages, each turn's content stripped.

    "\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant:" ->
    [user "Hi", assistant "Hello", user "Bye"]: a last, empty assistant turn is where the
    reply goes (the generation prompt), so it is not a message.
    """
    body = "\n\n" + text.lstrip() if text.lstrip().startswith("Human:") else text
    parts = _HH_TURN.split(body)
    if parts[0].strip():
        raise DataError(f"{origin}: the transcript has text before its first 'Human:' turn "
                        f"({parts[0].strip()[:40]!r}); --text-as-chat cannot give it a role")
    messages = [{"role": _HH_ROLES[role], "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def prompt_messages(prompt: str, origin: str = "") -> list[dict]:
    """A text prompt as messages: the turns of an HH transcript (it starts with "Human:"),
    else one user turn."""
    if not prompt.lstrip().startswith("Human:"):
        return [{"role": "user", "content": prompt.strip()}]
    messages = hh_to_messages(prompt, origin)
    if not messages or messages[-1]["role"] == "assistant":
        raise DataError(f"{origin}: the prompt ends inside an assistant turn, so --text-as-chat "
                        "has no user turn to answer; end the prompt with '\\n\\nAssistant:'")
    return messages


def completion_message(text: str, eos: str | None, origin: str, key: str) -> list[dict]:
    """A text completion as one assistant message (trailing EOS and outer whitespace off)."""
    if _HH_TURN.search(text):
        raise DataError(f"{origin}: field {key!r} holds a further 'Human:'/'Assistant:' turn; "
                        "--text-as-chat takes one assistant reply per completion")
    content = text.strip()
    if eos and content.endswith(eos):
        content = content[: -len(eos)].rstrip()
    return [{"role": "assistant", "content": content}]


def example_as_chat(example: dict, tokenizer: Any) -> dict:
    """A text example (prompt, chosen, rejected strings) as a conversational one; an example
    with an empty prompt or already in messages is returned as it is."""
    prompt = example["prompt"]
    if not isinstance(prompt, str) or not prompt:
        return example
    origin = example.get("origin", "")
    eos = tokenizer.eos_token
    return {**example, "prompt": prompt_messages(prompt, origin),
            "chosen": completion_message(example["chosen"], eos, origin, "chosen"),
            "rejected": completion_message(example["rejected"], eos, origin, "rejected")}


@dataclass(frozen=True)
class ChatTemplateOption(Section):
    """`--chat-template`, for a command that renders chat prompts with a tokenizer."""

    SECTION = "chat"

    chat_template: str | None = option(
        None, "jinja chat template file that replaces the one of the tokenizer (none = the "
        "tokenizer's own)", metavar="FILE")


@dataclass(frozen=True)
class ChatOptions(ChatTemplateOption):
    """`--chat-template` and `--text-as-chat`, for a command that tokenizes text rows."""

    text_as_chat: bool = option(
        False, "render text rows (prompt/completion strings, HH transcripts) as "
        "user/assistant turns with the chat template; off = plain text, as TRL")
