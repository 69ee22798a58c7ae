"""Tokenizer parity with transformers' GPT2TokenizerFast on the genuine GPT-2 vocabulary."""

import shutil

import pytest

from conftest import copy_vocab
from gpt2engine import GPT2EngineError, Tokenizer
from gpt2engine.tokenizer import StreamDecoder

TEXTS = [
    "Hello world",
    " the",
    "",
    "It's a dog's life, isn't it? We'll see; they'd've LOVED it.",
    "naïve café, Ünïcödé — “quotes” and ½ ≠ ∞; 日本語のテキスト; Ελληνικά; עברית; русский",
    "emoji 😀👍🏽 families 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "   leading spaces\t\ttabs\n\n\nnewlines   \r\n trailing   ",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F 2,000,000",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> spaced",
    "<|endoftext",
    "\u200b\u00a0\ufeff odd whitespace",
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory, gpt2_vocab):
    folder = tmp_path_factory.mktemp("vocab")
    copy_vocab(gpt2_vocab, folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(vocab_folder):
    return Tokenizer.from_pretrained(vocab_folder)


@pytest.fixture(scope="module")
def reference(vocab_folder):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(vocab_folder)


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" the") == [262]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.eot_id == 50256
    assert tokenizer.vocab_size == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_gpt2_tokenizer_fast(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_encode_matches_single(tokenizer):
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_tokenizer_json_alone(tmp_path, tokenizer, reference):
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert from_json.encode(text) == reference(text)["input_ids"]
        assert from_json.decode(from_json.encode(text)) == text


def test_stream_decoder_holds_back_split_characters(tokenizer):
    text = "🇫🇷 日本語 👨‍👩‍👧 ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token splits a character
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_flushes_a_broken_character_as_replacement(tokenizer):
    first_byte_of_emoji = tokenizer.encode("😀")[0]
    stream = StreamDecoder(tokenizer)
    assert stream.push(first_byte_of_emoji) == ""
    assert stream.flush() == "\ufffd"


def test_missing_or_broken_tokenizer_files(tmp_path, vocab_folder):
    with pytest.raises(GPT2EngineError, match="no tokenizer.json, nor vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(vocab_folder / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(GPT2EngineError, match="not a readable BPE vocabulary"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[]")
    with pytest.raises(GPT2EngineError, match=r"tokenizer.json: unreadable"):
        Tokenizer.from_pretrained(tmp_path)
