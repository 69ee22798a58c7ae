"""chat.py: chat templates rendered as transformers renders them, in Jinja's sandbox; the REPL's
conversation, trimmed from its oldest turn; `gpt2 --chat` through a pseudo-terminal."""

import json
import shutil

import pexpect
import pytest

from conftest import GPT2_COMMAND, quiet_transformers
from gpt2engine import GPT2EngineError
from gpt2engine.chat import ChatTemplate, Conversation
from gpt2engine.cli.repl import BANNER, PROMPT
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.sampling_params import SamplingParams

DIALOGPT = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture
def with_template(tiny_checkpoint, tmp_path):
    def make(template: str) -> tuple[ChatTemplate, object]:
        from gpt2engine import Tokenizer

        folder = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, folder, dirs_exist_ok=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": template, "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
             "tokenizer_class": "GPT2Tokenizer"}))
        tokenizer = Tokenizer.from_pretrained(folder)
        return ChatTemplate.find(tokenizer), folder

    return make


@pytest.mark.parametrize("template", [DIALOGPT, CHATML])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_as_transformers_renders_them(with_template, template, add_generation_prompt):
    ours, folder = with_template(template)
    theirs = quiet_transformers().AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(CONVERSATION, add_generation_prompt) == theirs


def test_continue_final_message_as_transformers(with_template):
    ours, folder = with_template(CHATML)
    partial = [*CONVERSATION, {"role": "assistant", "content": "I am a"}]
    theirs = quiet_transformers().AutoTokenizer.from_pretrained(folder).apply_chat_template(
        partial, tokenize=False, continue_final_message=True)
    assert ours.render(partial, add_generation_prompt=False, continue_final_message=True) == theirs
    assert theirs.endswith("<|im_start|>assistant\nI am a")


@pytest.mark.parametrize(("template", "message"), [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "access to attribute '__class__'"),
    ("{% set x = messages.append(1) %}", "access to attribute 'append' of 'list' object is unsafe"),
    ("{{ raise_exception('no system message') }}", "no system message"),
    ("{{ messages[0].content + 1 }}", "the chat template failed: TypeError"),
])
def test_a_template_runs_sandboxed_and_fails_in_one_message(with_template, template, message):
    ours, _ = with_template(template)
    with pytest.raises(GPT2EngineError, match=message):
        ours.render(CONVERSATION)


def test_where_the_template_comes_from(tiny_model, tmp_path, with_template):
    _, tokenizer = tiny_model
    assert ChatTemplate.find(tokenizer) is None  # GPT-2 itself has none
    (tmp_path / "t.jinja").write_text(DIALOGPT)
    assert ChatTemplate.find(tokenizer, str(tmp_path / "t.jinja")).source == DIALOGPT
    assert ChatTemplate.find(tokenizer, CHATML).source == CHATML  # the template itself
    with pytest.raises(GPT2EngineError, match="no such file"):
        ChatTemplate.find(tokenizer, str(tmp_path / "missing.jinja"))
    with pytest.raises(GPT2EngineError, match="chat template line 1"):
        ChatTemplate.find(tokenizer, "{% for m in messages %}")
    _, folder = with_template(CHATML)
    (folder / "chat_template.jinja").write_text(DIALOGPT)  # the file wins, as in transformers
    from gpt2engine import Tokenizer

    assert ChatTemplate.find(Tokenizer.from_pretrained(folder)).source == DIALOGPT


def test_a_conversation_drops_its_oldest_turns_to_fit(tiny_model):
    _, tokenizer = tiny_model
    template = ChatTemplate(DIALOGPT, {"eos_token": "<|endoftext|>"})
    conversation = Conversation(template, tokenizer, context=32, room=10)
    prompt, dropped = conversation.ask("one two three four five")
    assert dropped == 0 and prompt == "one two three four five<|endoftext|>"
    conversation.answer("six seven eight nine ten")
    prompt, dropped = conversation.ask("eleven twelve")
    assert dropped == 0 and len(conversation.messages) == 3
    conversation.answer("thirteen fourteen fifteen sixteen seventeen eighteen nineteen")
    prompt, dropped = conversation.ask("twenty")
    assert dropped >= 1 and len(tokenizer.encode(prompt)) + 10 <= 32
    assert prompt.endswith("twenty<|endoftext|>")
    with pytest.raises(GPT2EngineError, match="do not fit the model's context of 32"):
        conversation.ask("word " * 60)
    assert conversation.messages == []


@pytest.mark.slow
def test_the_repl_keeps_the_conversation_and_resets(tiny_checkpoint, tiny_model):
    model, tokenizer = tiny_model
    options = GenerationOptions(max_new_tokens=6, sampling=SamplingParams(temperature=0), ignore_eos=True)

    def answer(prompt: str) -> str:
        return complete(model, tokenizer, [prompt], options)[0].text

    first = answer("Hello<|endoftext|>")
    second = answer(f"Hello<|endoftext|>{first}<|endoftext|>How are you<|endoftext|>")
    after_reset = answer("How are you<|endoftext|>")
    flags = ["--chat", "--chat-template", DIALOGPT, "--temperature", "0", "--max-new-tokens", "6",
             "--ignore-eos"]
    child = pexpect.spawn(GPT2_COMMAND, ["--model", str(tiny_checkpoint), *flags], encoding="utf-8",
                          timeout=60, dimensions=(40, 500))
    child.expect_exact(BANNER)
    child.expect_exact(PROMPT)
    for line, expected in (("Hello", first), ("How are you", second), ("/reset", None),
                           ("How are you", after_reset)):
        child.sendline(line)
        child.expect_exact(PROMPT)
        if expected is None:
            assert "starts over" in child.before
        else:
            assert child.before.replace("\r\n", "\n") == f"{line}\n{expected}\n"
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_without_a_template_says_how_to_give_one(tiny_checkpoint):
    import subprocess

    done = subprocess.run([GPT2_COMMAND, "--model", str(tiny_checkpoint), "--chat", "--quiet"], input="",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no chat template" in done.stderr and "--chat-template" in done.stderr
