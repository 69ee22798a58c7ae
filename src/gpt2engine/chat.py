"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered into the prompt
text a model was fine-tuned on, by the Jinja template that comes with it, as transformers'
`apply_chat_template` and vLLM's chat endpoint render it.

The template is the checkpoint's own (`chat_template` in `tokenizer_config.json`, or a
`chat_template.jinja` file) or one given (`--chat-template FILE_OR_STRING`). It runs in Jinja's
immutable sandbox (no attribute of Python's internals, no mutation of what it is given), with
transformers' settings (trim_blocks, lstrip_blocks, loop controls) and names: `messages`,
`add_generation_prompt`, the tokenizer's special tokens (`eos_token`, `bos_token`...),
`raise_exception(message)`. Nothing here knows of HTTP or terminals: a template that cannot be
rendered is a GPT2EngineError naming the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2engine.errors import GPT2EngineError
from gpt2engine.tokenizer import Tokenizer

MAX_TEMPLATE_BYTES = 2**20
NO_TEMPLATE = ("this model has no chat template (no chat_template in its tokenizer_config.json, no "
               "chat_template.jinja); give one with --chat-template FILE_OR_STRING (a Jinja template, "
               "as transformers' chat_template)")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    special_tokens: dict[str, str]  # eos_token, bos_token, ... as the template sees them

    @classmethod
    def find(cls, tokenizer: Tokenizer, given: str | None = None) -> ChatTemplate | None:
        """`given` (a file's path or the template itself), else the one beside the tokenizer's
        files (the checkpoint's), else None."""
        tokens = special_tokens(tokenizer)
        if given is not None:
            if not looks_like_path(given):
                return cls.checked(given, tokens, "--chat-template")
            path = Path(given).expanduser()
            return cls.checked(read_template(path), tokens, str(path))
        folder = tokenizer.folder
        if (folder / "chat_template.jinja").is_file():
            return cls.checked(read_template(folder / "chat_template.jinja"), tokens,
                               str(folder / "chat_template.jinja"))
        config = folder / "tokenizer_config.json"
        if not config.is_file():
            return None
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise GPT2EngineError(f"{config}: not a JSON object") from None
        if isinstance(template, list):  # named templates, as transformers allows: the default one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is None:
            return None
        if not isinstance(template, str):
            raise GPT2EngineError(f"{config}: chat_template must be a string")
        return cls.checked(template, tokens, str(config))

    @classmethod
    def checked(cls, source: str, special_tokens: dict[str, str], where: str) -> ChatTemplate:
        """A template whose syntax is checked now (a start-up error, not every request's)."""
        import jinja2

        try:
            environment().parse(source)
        except jinja2.TemplateSyntaxError as error:
            raise GPT2EngineError(f"{where}: chat template line {error.lineno}: {error.message}") from None
        return cls(source, special_tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """The prompt text of a conversation; with `continue_final_message`, the text stops at the
        end of the last message (an assistant's turn to go on with) instead of closing it."""
        import jinja2

        if add_generation_prompt and continue_final_message:
            raise GPT2EngineError("add_generation_prompt and continue_final_message cannot both be true")
        if not messages:
            raise GPT2EngineError("messages must not be empty")
        try:
            text = environment().from_string(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as error:
            raise GPT2EngineError(f"the chat template failed: {error}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise GPT2EngineError(f"the chat template failed: {type(error).__name__}: {error}") from None
        if continue_final_message:
            final = content_text(messages[-1]).strip()
            if final not in text:
                raise GPT2EngineError("continue_final_message: the template does not show the final "
                                      "message's text as it is")
            text = text[: text.rindex(final) + len(final)]
        return text


@dataclass
class Conversation:
    """The REPL's chat: the turns so far, rendered whole each time, the oldest dropped when the
    prompt and `room` new tokens would not fit `context`."""

    template: ChatTemplate
    tokenizer: Tokenizer
    context: int
    room: int  # tokens kept free for the answer
    messages: list[dict[str, str]] = field(default_factory=list)

    def ask(self, text: str) -> tuple[str, int]:
        """Add the user's turn -> (the prompt to answer, how many earlier turns were dropped)."""
        self.messages.append({"role": "user", "content": text})
        dropped = 0
        while True:
            prompt = self.template.render(self.messages)
            if len(self.tokenizer.encode(prompt)) + self.room <= self.context:
                return prompt, dropped
            if len(self.messages) == 1:
                self.messages.clear()
                raise GPT2EngineError(f"this message and {self.room} new tokens do not fit the model's "
                                      f"context of {self.context} tokens")
            del self.messages[0]
            dropped += 1

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def forget_question(self) -> None:
        """The last question got no answer (interrupted, failed): as if it was never asked."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The names a template may use for the tokenizer's special tokens (GPT-2: <|endoftext|> for all)."""
    if tokenizer.eot_id is None:
        return {}
    eot = tokenizer.decode([tokenizer.eot_id])
    return {"eos_token": eot, "bos_token": eot, "unk_token": eot}


def content_text(message: dict[str, Any]) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def looks_like_path(given: str) -> bool:
    """--chat-template takes a file or the template itself: a template has Jinja in it."""
    return "{{" not in given and "{%" not in given


def read_template(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise GPT2EngineError(f"{path}: a chat template over {MAX_TEMPLATE_BYTES // 2**20} MiB")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GPT2EngineError(f"{path}: no such file (--chat-template takes a file or a Jinja "
                              "template)") from None
    except UnicodeDecodeError:
        raise GPT2EngineError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise GPT2EngineError(f"{path}: cannot read ({error.strerror})") from None


def environment():
    """transformers' Jinja environment for chat templates, in the immutable sandbox."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env
