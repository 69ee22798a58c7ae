"""Tokenizer parity with transformers' GPT2TokenizerFast on the genuine GPT-2 vocabulary, for our
BPE (bpe.c) and for the `tokenizers` library that stands in where the kernels cannot be built."""

import json
import re
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, copy_vocab, run_gpt2
from gpt2engine import GPT2EngineError, Tokenizer, native
from gpt2engine import tokenizer as tokenizer_module
from gpt2engine.generate import complete
from gpt2engine.tokenizer import NativeBPE, StreamDecoder

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


@pytest.fixture(scope="module", params=["bpe.c", "tokenizers"])
def tokenizer(request, vocab_folder):
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "tokenizers":
            patch.setattr(tokenizer_module, "bpe_library", lambda: None)
        loaded = Tokenizer.from_pretrained(vocab_folder)
    assert isinstance(loaded.bpe, NativeBPE) == (request.param == "bpe.c")
    return loaded


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


def reference_ids(reference, text: str) -> list[int]:
    return reference.backend_tokenizer.encode(text, add_special_tokens=False).ids


def class_run_edges() -> list[int]:
    """The code points at both edges of every run of bpe.c's character classes (and either side of
    them), and every 101st code point."""
    header = (native.HERE / "tokenizer" / "unicode_classes.h").read_text(encoding="utf-8")
    pattern = r"\{0x([0-9A-F]+), 0x([0-9A-F]+), [LNS]\}"
    runs = [(int(a, 16), int(b, 16)) for a, b in re.findall(pattern, header)]
    assert len(runs) > 500
    points = {p for a, b in runs for p in (a - 1, a, b, b + 1)} | set(range(0, 0x110000, 101))
    return sorted(p for p in points if 0 <= p < 0x110000 and not 0xD800 <= p <= 0xDFFF)


def test_every_character_class_edge(tokenizer, reference):
    """Each code point after a letter, a digit, a space, a punctuation mark, and before a newline:
    a code point classed otherwise than by the regex of `tokenizers` splits differently."""
    text = "".join(f"a{c}1{c} {c}!{c}\n" for c in map(chr, class_run_edges()))
    assert tokenizer.encode(text) == reference_ids(reference, text)


SAMPLES = "aZéß日ж1٣½²  \t\n\r\u00a0\u3000\u2028'\u2019!?.-_😀\u0301\u200dsdtlmvreLL"


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(SAMPLES) | st.characters(exclude_categories=["Cs"]), max_size=40))
def test_random_text(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference_ids(reference, text)


@pytest.mark.parametrize("text", ["a" * 100_000, "!?" * 50_000, " " * 100_000 + "x", "\n" * 100_000,
                                  "1" * 100_000, "'s" * 50_000])
def test_long_pieces(tokenizer, reference, text):
    """One piece of 100,000 characters: the merges go through a heap (n log n, not n^2)."""
    assert tokenizer.encode(text) == reference_ids(reference, text)


def test_tokenizer_json_alone(tmp_path, reference):
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert from_json.encode(text) == reference(text)["input_ids"]
        assert from_json.decode(from_json.encode(text)) == text


def test_tokenizer_json_prefix_space_and_added_tokens(tmp_path, vocab_folder):
    """tokenizer.json's own settings, with `tokenizers` reading the same file as the reference."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from transformers import GPT2TokenizerFast

    backend = GPT2TokenizerFast.from_pretrained(vocab_folder, add_prefix_space=True).backend_tokenizer
    backend.add_tokens([AddedToken("<|user|>", normalized=False), AddedToken("user|>x", normalized=False)])
    backend.save(str(tmp_path / "tokenizer.json"))
    ours, theirs = Tokenizer.from_pretrained(tmp_path), Backend.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.add_prefix_space and ours.vocab_size == 50259
    for text in [*TEXTS, "<|user|>hi<|user|>x <|endoftext|>  <|user|>"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text


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


def test_tokenizer_json_without_added_tokens(tmp_path, reference):
    """No <|endoftext|> then: its text is ordinary text, as `tokenizers` reading the file has it."""
    from tokenizers import Tokenizer as Backend

    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    state = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    state["added_tokens"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    ours, theirs = Tokenizer.from_pretrained(tmp_path), Backend.from_file(str(tmp_path / "tokenizer.json"))
    text = "before<|endoftext|>after"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    assert 50256 not in ours.encode(text)


@pytest.mark.slow
def test_tokenizer_json_that_is_not_gpt2s_bpe_is_refused(tmp_path, reference):
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    state = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    for change, message in [
        (lambda s: s.update(normalizer={"type": "NFC"}), "a normalizer"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer Whitespace"),
        (lambda s: s["model"].update(dropout=0.1), "BPE dropout"),
        (lambda s: s["added_tokens"][0].update(lstrip=True), "added token '<|endoftext|>' with lstrip"),
        (lambda s: s["model"]["merges"].append("Ġt nowhere"), "merge 50001 .* 'nowhere'"),
        (lambda s: s["model"]["vocab"].update(huge=2**40), "token 'huge' has id 1099511627776"),
    ]:
        broken = json.loads(json.dumps(state))
        change(broken)
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(GPT2EngineError, match=message):
            Tokenizer.from_pretrained(tmp_path)


def test_missing_or_broken_tokenizer_files(tmp_path, vocab_folder):
    with pytest.raises(GPT2EngineError, match="no tokenizer.json, nor vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(vocab_folder / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(GPT2EngineError, match="not a readable BPE vocabulary"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text('["a list"]')
    with pytest.raises(GPT2EngineError, match="not a non-empty object of token -> id"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(vocab_folder / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n", encoding="utf-8")
    with pytest.raises(GPT2EngineError, match="line 3 is not two tokens"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[]")
    with pytest.raises(GPT2EngineError, match=r"tokenizer.json: unreadable"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("vocab", [{"a": 10**12}, {"a": 2**22}, {}])
def test_a_tiny_vocabulary_with_a_huge_id_or_none(copy_of, vocab):
    folder = copy_of()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    done = run_gpt2("generate", "Hi", "--model", str(folder))
    assert_one_line_error(done, 1, "vocabulary")
    with pytest.raises(GPT2EngineError, match="vocabulary"):
        Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("prompt", ["\ud800", "fine \udcff then", "\udfff"])
def test_lone_surrogates_through_the_api(tiny_model, prompt):
    with pytest.raises(GPT2EngineError, match="lone surrogate"):
        complete(*tiny_model, [prompt])


@given(st.text())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_text_round_trips_or_is_refused(tiny_model, text):
    _, tokenizer = tiny_model
    try:
        ids = tokenizer.encode(text)
    except GPT2EngineError as error:
        assert "lone surrogate" in str(error)
        return
    assert tokenizer.decode(ids) == text


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_round_trip_when_utf8_and_are_refused_when_not(tiny_model, data):
    _, tokenizer = tiny_model
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        ids = tokenizer.encode(text)
    except GPT2EngineError:
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
        return
    assert tokenizer.decode(ids).encode("utf-8") == data
