"""GPT-2's byte-level BPE: the same ids as transformers' GPT2TokenizerFast, from a checkpoint's
`tokenizer.json` or `vocab.json` + `merges.txt`.

GPT-2 maps every byte to a printable character, splits text with its regex, then applies the
merges. Added tokens (`<|endoftext|>`) are matched in the raw text first: the literal text encodes
to the token's single id, as in GPT2TokenizerFast. The text between them goes to our BPE in C
(bpe.c: a small fraction of the memory the `tokenizers` library holds; docs/tokenizer.md), or
to `tokenizers` where the kernels cannot be built. Decoding
goes through bytes, so a stream can hold back a character whose UTF-8 bytes are split across tokens.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from pathlib import Path
from typing import cast

from gpt2engine import native
from gpt2engine.errors import GPT2EngineError
from gpt2engine.loading.hub import resolve_checkpoint

END_OF_TEXT = "<|endoftext|>"
MAX_VOCAB = 2**22  # the largest vocabulary GPT2Config allows
MAX_MERGES = 2**20 - 2  # bpe.c keeps a merge's rank in 20 bits (GPT-2 has 50,000)


@cache
def byte_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


@dataclass(frozen=True)
class Vocabulary:
    """A byte-level BPE as its files give it."""

    tokens: dict[str, int]  # in GPT-2's printable byte alphabet
    merges: list[str]  # "left right", in rank order (strings, not 50,000 tuples: see Tokenizer)
    added: dict[str, int]  # matched in the raw text before BPE
    add_prefix_space: bool = False


def read_vocabulary(folder: Path) -> Vocabulary:
    """`tokenizer.json`, else `vocab.json` + `merges.txt`."""
    if (folder / "tokenizer.json").is_file():
        return read_tokenizer_json(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return read_vocab_and_merges(folder / "vocab.json", folder / "merges.txt")
    raise GPT2EngineError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")


def read_vocab_and_merges(vocab_json: Path, merges_txt: Path) -> Vocabulary:
    """OpenAI's encoder.json/vocab.bpe (= Hugging Face's vocab.json/merges.txt); `<|endoftext|>`
    is an added token when the vocabulary has it, as in GPT2TokenizerFast."""
    where = f"{vocab_json} / {merges_txt}"
    try:
        tokens = json.loads(vocab_json.read_text(encoding="utf-8"))
        lines = merges_txt.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GPT2EngineError(f"{where}: not a readable BPE vocabulary ({error})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.startswith("#version"):
            if line.count(" ") != 1:
                raise GPT2EngineError(f"{merges_txt}: line {number} is not two tokens and a space: "
                                      f"{line[:80]!r}")
            merges.append(line.removesuffix("\r"))
    check_tokens(tokens, where)
    added = {END_OF_TEXT: tokens[END_OF_TEXT]} if END_OF_TEXT in tokens else {}
    return Vocabulary(tokens, merges, added)


def read_tokenizer_json(path: Path) -> Vocabulary:
    """A `tokenizers` file, if it describes GPT-2's byte-level BPE (anything else is refused by
    name rather than tokenized differently from transformers)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        model, pre = state["model"], state["pre_tokenizer"] or {}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = {t["content"]: t["id"] for t in state.get("added_tokens") or []}
        tokens = model["vocab"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise GPT2EngineError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    unsupported = [
        *(["a normalizer"] if state.get("normalizer") else []),
        *([f"pre-tokenizer {pre.get('type')}"] if pre.get("type") != "ByteLevel" or not pre.get(
            "use_regex", True) else []),
        *([f"model {model.get('type')}"] if model.get("type", "BPE") != "BPE" else []),
        *(f"BPE {key}" for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                   "byte_fallback", "ignore_merges") if model.get(key)),
        *(f"added token {t.get('content')!r} with {flag}" for t in state.get("added_tokens") or []
          for flag in ("single_word", "lstrip", "rstrip") if t.get(flag)),
    ]
    if unsupported:
        raise GPT2EngineError(f"{path}: {unsupported[0]} is not part of GPT-2's byte-level BPE")
    if any(not isinstance(m, str) or m.count(" ") != 1 for m in merges):
        raise GPT2EngineError(f"{path}: a merge is not a pair of tokens without spaces")
    check_tokens(tokens, str(path))
    if added:  # (a tokenizer.json may have none)
        check_tokens(added, str(path))
    return Vocabulary(tokens, merges, added, bool(pre.get("add_prefix_space")))


def check_tokens(tokens: object, where: str) -> None:
    if not isinstance(tokens, dict) or not tokens:
        raise GPT2EngineError(f"{where}: the vocabulary is not a non-empty object of token -> id")
    for text, token_id in tokens.items():
        if type(token_id) is not int or not 0 <= token_id < MAX_VOCAB:  # ids index a table: a 30-byte
            raise GPT2EngineError(  # file must not allocate gigabytes
                f"{where}: token {text!r} has id {token_id!r}; ids are integers in [0, {MAX_VOCAB})")


class TokenBytes:
    """Each id's bytes, kept in one string of bytes (a list of bytes objects would be several
    times larger)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.blob = b"".join(pieces)
        self.ends = array("I" if len(self.blob) < 2**32 else "Q", accumulate(map(len, pieces)))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self.ends):
            raise IndexError(f"token id {token_id} is not in [0, {len(self.ends)})")
        return self.blob[self.ends[token_id - 1] if token_id else 0 : self.ends[token_id]]


def token_bytes(vocabulary: Vocabulary) -> TokenBytes:
    """Byte-level tokens decode through GPT-2's table; added tokens (and any token outside the
    table's alphabet) are their own UTF-8."""
    to_bytes = {ord(ch): b for b, ch in enumerate(byte_to_unicode())}  # str.translate tables:
    unknown_only = dict.fromkeys(to_bytes)  # C loops, a quarter of the time of Python ones
    tokens = {**vocabulary.tokens, **vocabulary.added}
    pieces = [b""] * (max(tokens.values()) + 1)
    for text, token_id in tokens.items():
        byte_level = text not in vocabulary.added and not text.translate(unknown_only)
        pieces[token_id] = text.translate(to_bytes).encode("latin-1") if byte_level else text.encode()
    return TokenBytes(pieces)


def bpe_library() -> ctypes.CDLL | None:
    """Our BPE library (bpe.c, built by native.py), None where it cannot be built."""
    return native.load(native.BPE)


class NativeBPE:
    """bpe.c over one vocabulary's merges: text -> ids, with no added tokens in it."""

    def __init__(self, shared: ctypes.CDLL, byte_ids: array, merges: array) -> None:
        # byte_ids: 256 ids (-1: none); merges: the left, right and merged ids of each, in 3 runs
        self.shared, count = shared, len(merges) // 3
        start = merges.buffer_info()[0]
        self.handle = shared.gpt2engine_bpe_new(byte_ids.buffer_info()[0], count,
                                                *(start + merges.itemsize * count * k for k in range(3)))
        if not self.handle:
            raise MemoryError("no memory for the tokenizer's merges")

    def __call__(self, text: str) -> list[int]:
        data = text.encode()
        ids = array("i", [0]) * len(data)  # (an array, not a ctypes type made per length)
        count = self.shared.gpt2engine_bpe_encode(self.handle, data, len(data), ids.buffer_info()[0])
        if count < 0:
            raise MemoryError("no memory to tokenize the text")
        return ids[:count].tolist()

    def __del__(self) -> None:
        self.shared.gpt2engine_bpe_free(self.handle)


def bpe_encoder(vocabulary: Vocabulary, where: str) -> Callable[[str], list[int]]:
    """Our BPE (bpe.c) where our C library is built, else the `tokenizers` library's."""
    tokens, count = vocabulary.tokens, len(vocabulary.merges)
    if count > MAX_MERGES:
        raise GPT2EngineError(f"{where}: {count:,} merges; the most a BPE here may have is {MAX_MERGES:,}")
    merges = array("i", [0]) * (3 * count)
    for rank, merge in enumerate(vocabulary.merges):
        left, right = merge.split(" ")
        ids = tokens.get(left), tokens.get(right), tokens.get(left + right)
        if None in ids:
            missing = (left, right, left + right)[ids.index(None)]
            raise GPT2EngineError(f"{where}: merge {rank + 1} ({left} {right}) needs token {missing!r}, "
                                  "which is not in the vocabulary")
        merges[rank], merges[count + rank], merges[2 * count + rank] = cast("tuple[int, int, int]", ids)
    if (shared := bpe_library()) is not None:
        return NativeBPE(shared, array("i", [tokens.get(ch, -1) for ch in byte_to_unicode()]), merges)
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    pairs = [(left, right) for left, right in (merge.split(" ") for merge in vocabulary.merges)]
    backend = Backend(models.BPE(tokens, pairs))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # we add the space
    return lambda text: backend.encode(text, add_special_tokens=False).ids


GPT2_VOCABULARY = Path(__file__).parent / "gpt2"  # GPT-2's vocab.json and merges.txt (OpenAI, MIT)


def tokenizer_folder(checkpoint: Path) -> Path:
    """Where a checkpoint's tokenizer files are: its folder, or for a training checkpoint (one
    file, no tokenizer: nanoGPT, llm.c) GPT-2's own, which both use."""
    return checkpoint if checkpoint.is_dir() else GPT2_VOCABULARY


class Tokenizer:
    def __init__(self, vocabulary: Vocabulary, folder: Path) -> None:
        self.folder = folder  # where the vocabulary was read (an export copies it from there)
        self.bpe = bpe_encoder(vocabulary, str(folder))
        self.token_bytes = token_bytes(vocabulary)
        self.added = dict(vocabulary.added)
        self.add_prefix_space = vocabulary.add_prefix_space
        longest_first = sorted(self.added, key=len, reverse=True)  # as GPT2TokenizerFast: leftmost-longest
        self.split_added = re.compile(f"({'|'.join(map(re.escape, longest_first))})").split if self.added \
            else lambda text: [text]
        self.eot_id: int | None = self.added.get(END_OF_TEXT, vocabulary.tokens.get(END_OF_TEXT))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None) -> Tokenizer:
        """Read `tokenizer.json`, else `vocab.json` + `merges.txt`, from a folder or a Hub id; a
        nanoGPT or llm.c checkpoint file gets GPT-2's own (bundled)."""
        folder = tokenizer_folder(resolve_checkpoint(name_or_path, revision))
        return cls(read_vocabulary(folder), folder)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self.split_added(checked_text(text))):
            if i % 2:  # the split's odd parts are the added tokens it cut at
                ids.append(self.added[part])
            elif part:
                ids += self.bpe(" " + part if self.add_prefix_space and not part.startswith(" ") else part)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

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
