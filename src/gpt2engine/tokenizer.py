"""GPT-2's byte-level BPE, built on the `tokenizers` library with GPT-2's exact settings.

GPT-2 maps every byte to a printable character, splits text with its regex, then applies the
merges. `<|endoftext|>` is a special token: the literal text encodes to its single id, as in
transformers' GPT2TokenizerFast. Decoding goes through bytes, so a stream can hold back a
character whose UTF-8 bytes are split across tokens.
"""

from __future__ import annotations

import codecs
from functools import cache
from pathlib import Path

from gpt2engine.errors import GPT2EngineError
from gpt2engine.hub import resolve_checkpoint

END_OF_TEXT = "<|endoftext|>"
MAX_VOCAB = 2**22  # the largest vocabulary GPT2Config allows


@cache
def unicode_to_byte() -> dict[str, int]:
    """Invert GPT-2's byte -> printable character table (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class Tokenizer:
    def __init__(self, backend) -> None:  # backend: tokenizers.Tokenizer
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise GPT2EngineError("the tokenizer's vocabulary is empty")
        largest = max(vocab.values())
        if largest >= MAX_VOCAB:  # ids index a table: a 30-byte file must not allocate gigabytes
            raise GPT2EngineError(f"the tokenizer's vocabulary has token id {largest}; the limit is "
                                  f"{MAX_VOCAB - 1}")
        special = {token.content for token in backend.get_added_tokens_decoder().values()}
        to_bytes = {ord(ch): b for ch, b in unicode_to_byte().items()}  # str.translate tables:
        unknown_only = dict.fromkeys(to_bytes)  # C loops, a quarter of the time of Python ones
        self.token_bytes: list[bytes] = [b""] * (largest + 1)
        for text, token_id in vocab.items():
            byte_level = text not in special and not text.translate(unknown_only)
            self.token_bytes[token_id] = (
                text.translate(to_bytes).encode("latin-1") if byte_level else text.encode("utf-8")
            )
        self.eot_id: int | None = vocab.get(END_OF_TEXT)

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path) -> Tokenizer:
        """GPT-2's tokenizer from OpenAI's encoder.json/vocab.bpe (= HF's vocab.json/merges.txt)."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        except Exception as error:  # tokenizers raises plain Exceptions for unreadable files
            raise GPT2EngineError(
                f"{vocab_json} / {merges_txt}: not a readable BPE vocabulary ({error})"
            ) from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if backend.token_to_id(END_OF_TEXT) is not None:
            backend.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
        return cls(backend)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None) -> Tokenizer:
        """Read `tokenizer.json`, else `vocab.json` + `merges.txt`, from a folder or a Hub id."""
        folder = resolve_checkpoint(name_or_path, revision)
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as Backend

            try:
                return cls(Backend.from_file(str(folder / "tokenizer.json")))
            except Exception as error:
                raise GPT2EngineError(f"{folder / 'tokenizer.json'}: unreadable ({error})") from None
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt")
        raise GPT2EngineError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(checked_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = [checked_text(t) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD, as in transformers."""
        bad = [i for i in ids if type(i) is not int or not 0 <= i < len(self.token_bytes)]
        if bad:
            raise GPT2EngineError(f"token id {bad[0]!r} is not in the vocabulary "
                                  f"[0, {len(self.token_bytes)})")
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


def checked_text(text: str) -> str:
    """Text that is valid Unicode: a lone surrogate (from bad bytes decoded with surrogateescape,
    or a JSON "\\ud800") has no UTF-8 form and no token."""
    if not isinstance(text, str):
        raise GPT2EngineError(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise GPT2EngineError(
            f"text is not valid Unicode: lone surrogate U+{ord(text[error.start]):04X} at "
            f"character {error.start} (invalid UTF-8 in the input?)") from None
    return text


class StreamDecoder:
    """Turns tokens into text one at a time, holding back a character until its bytes are whole."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.token_bytes = tokenizer.token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes[token_id])

    def flush(self) -> str:
        """What is still held back, at the end of the stream (U+FFFD for a broken character)."""
        return self.utf8.decode(b"", final=True)
