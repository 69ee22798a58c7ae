"""`gpt2` with no command: the interactive prompt. Each response streams; Ctrl-C during one stops
only that one; exit, quit, Ctrl-D or Ctrl-C at the prompt leave. With --chat, the prompts and
answers are a conversation, rendered by the model's chat template (chat.py); /reset starts over."""

from __future__ import annotations

import argparse
import contextlib
import sys

from gpt2engine.chat import NO_TEMPLATE, ChatTemplate, Conversation
from gpt2engine.cli.generate import respond
from gpt2engine.cli.load import load_engine
from gpt2engine.errors import GPT2EngineError

BANNER = "GPT-2 Inference Engine Ready"


PROMPT = "Prompt (Type 'exit' or 'quit' to exit.) > "


def run_repl(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):  # readline gives input() line editing and history
        import readline  # noqa: F401
    engine = load_engine(args)
    conversation = None
    if args.chat:
        template = ChatTemplate.find(engine.tokenizer, args.chat_template)
        if template is None:
            raise GPT2EngineError(NO_TEMPLATE)
        conversation = Conversation(template, engine.tokenizer, engine.max_len, args.options.max_new_tokens)
    print(BANNER, flush=True)
    if conversation is not None:
        print("Chat mode: each prompt is your turn of the conversation; /reset starts over.", flush=True)
    while True:
        try:
            prompt = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
            print()
            return 0
        except UnicodeDecodeError as error:  # bytes that are not UTF-8: say so, keep the session
            print(f"error: the line is not UTF-8 text (byte {error.start})", file=sys.stderr, flush=True)
            continue
        if prompt.strip() in ("exit", "quit"):
            return 0
        if not prompt.strip():
            continue
        if conversation is not None and prompt.strip() == "/reset":
            conversation.messages.clear()
            print("[the conversation starts over]", flush=True)
            continue
        try:
            if conversation is None:
                respond(engine, prompt, args.options, args.stats)
                continue
            text, dropped = conversation.ask(prompt)
            if dropped:
                print(f"[the {dropped} oldest turns no longer fit the context: dropped]", flush=True)
            conversation.answer(respond(engine, text, args.options, args.stats).text)
        except KeyboardInterrupt:  # Ctrl-C during a response: drop it, back to the prompt
            engine.reset()
            if conversation is not None:
                conversation.forget_question()
            print("\n[interrupted]", flush=True)
        except GPT2EngineError as error:  # e.g. a prompt too long for the context
            if conversation is not None:
                conversation.forget_question()
            print(f"error: {error}", file=sys.stderr, flush=True)
