"""Token shards: tokenize a corpus once into memory-mapped arrays plus ``meta.json``.

Layout of a data directory (one per source x tokenizer x mode x sequence length)::

    DIR/meta.json            what was prepared, counts, hashes (the contract with every reader)
    DIR/{split}.bin          token ids, shape [rows, L], uint16 when the ids fit, else uint32
    DIR/{split}.len.bin      uint32 [rows]: how many leading positions of the row are real tokens
    DIR/tokenizer.json ...   files of a trained tokenizer (chars, bpe:N)

Modes:
- ``wrap``: every document is followed by EOS; documents are concatenated into one stream per split
  and cut into consecutive rows of L tokens (BD3-LM / OpenWebText style). Only the last row of a
  split can be short; it is padded with PAD and its length records where the real tokens stop, so
  no token is dropped.
- ``pad``: one document per row, ``[BOS] doc [EOS]`` (BOS only when the tokenizer has one),
  truncated to L and padded with PAD (MDLM's LM1B style). Truncations are counted in meta.json.

The loss/attention mask of a row is ``arange(L) < length``. A data directory is written under a
temporary name and renamed when complete, so a crash never leaves a half-written directory, and an
existing directory is reused only when its ``inputs_hash`` equals that of the request.

``tokenizer_from=DIR``: a trained tokenizer (``chars``, ``bpe:N``) is not trained on this corpus but loaded
from another prepared directory (its files, e.g. the comparison corpus's), so a second corpus is tokenized with
the very ids a model was trained with (zero-shot evaluation). The tokenizer's fingerprint then enters the
``inputs_hash`` (and meta.json's ``tokenizer.from`` names DIR).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dlm import __version__
from dlm.data.sources import Source
from dlm.data.specials import SpecialIds
from dlm.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer, needs_training
from dlm.errors import DlmError
from dlm.io import exclusive_lock, write_json_atomic

FORMAT_VERSION = 1
MODES = ("wrap", "pad")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
VERIFY_FULL_HASH_BELOW = 1 << 30  # bytes; larger shards are checked by size only when opened
_CHUNK_DOCS = 2048


def default_dtype(vocab_size: int) -> str:
    """uint16 when every id, including an appended MASK id K, fits; else uint32."""
    return "uint16" if vocab_size + 1 <= 1 << 16 else "uint32"


def _check_request(seq_len: int, mode: str, dtype: str | None) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DlmError(f"sequence length must be an integer >= 2, got {seq_len!r}")
    if mode not in MODES:
        raise DlmError(f"unknown shard mode {mode!r} (choose from {', '.join(MODES)})")
    if dtype is not None and dtype not in DTYPES:
        raise DlmError(f"unknown shard dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def _check_dtype_fits(dtype: str, vocab_size: int, tokenizer_name: str) -> None:
    if dtype == "uint16" and vocab_size + 1 > 1 << 16:
        raise DlmError(
            f"tokenizer {tokenizer_name} has {vocab_size} ids (+1 for MASK): too many for uint16; use uint32"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "corpus"


def inputs_hash(
    source: Source,
    tokenizer_spec: str,
    seq_len: int,
    mode: str,
    dtype: str | None,
    tokenizer_fingerprint: str | None = None,
    splits: Sequence[str] | None = None,
) -> str:
    """Content hash of everything that determines the shards (the reuse key). ``tokenizer_fingerprint``: that of
    a trained tokenizer taken from another directory (``tokenizer_from``); ``splits``: the splits written when not
    all of the source's. None for either leaves the key, hence every existing hash, as it was."""
    key: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": source.fingerprint(),
        "tokenizer": tokenizer_spec,
        "seq_len": seq_len,
        "mode": mode,
        "dtype": dtype,
    }
    if tokenizer_fingerprint is not None:
        key["tokenizer_fingerprint"] = tokenizer_fingerprint
    if splits is not None:
        key["splits"] = sorted(splits)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_data_dir(root: Path, source: Source, tokenizer_spec: str, seq_len: int, mode: str, h: str) -> Path:
    return Path(root) / f"{_slug(source.name)}-{_slug(tokenizer_spec)}-{mode}{seq_len}-{h[:8]}"


# ----------------------------------------------------------------------------- writing


class _RowWriter:
    """Appends rows and lengths to the two files of one split, hashing as it goes."""

    def __init__(self, directory: Path, split: str, seq_len: int, dtype: str, pad: int) -> None:
        self.L, self.np_dtype, self.pad = seq_len, DTYPES[dtype], pad
        self.ids_name, self.len_name = f"{split}.bin", f"{split}.len.bin"
        self._ids = open(directory / self.ids_name, "wb")  # noqa: SIM115 (closed in close())
        self._lens = open(directory / self.len_name, "wb")  # noqa: SIM115
        self._h_ids, self._h_lens = hashlib.sha256(), hashlib.sha256()
        self.rows = self.tokens = 0

    def write(self, rows: list[list[int]]) -> None:
        if not rows:
            return
        block = np.full((len(rows), self.L), self.pad, dtype=self.np_dtype)
        lens = np.empty(len(rows), dtype=np.uint32)
        for i, r in enumerate(rows):
            block[i, : len(r)] = r
            lens[i] = len(r)
        b_ids, b_lens = block.tobytes(), lens.tobytes()
        self._ids.write(b_ids)
        self._lens.write(b_lens)
        self._h_ids.update(b_ids)
        self._h_lens.update(b_lens)
        self.rows += len(rows)
        self.tokens += int(lens.sum())

    def close(self) -> dict[str, Any]:
        for f in (self._ids, self._lens):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {
            "files": {"ids": self.ids_name, "lengths": self.len_name},
            "sha256": {"ids": self._h_ids.hexdigest(), "lengths": self._h_lens.hexdigest()},
        }


def _chunks(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in docs:
        if d.strip():
            chunk.append(d)
            if len(chunk) == n:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _write_split(
    source: Source, split: str, tok: Tokenizer, directory: Path, seq_len: int, mode: str, dtype: str
) -> dict[str, Any]:
    sp: SpecialIds = tok.specials
    w = _RowWriter(directory, split, seq_len, dtype, sp.pad)
    stats = {"documents": 0, "bytes": 0, "truncated_documents": 0, "truncated_tokens": 0}
    buf: list[int] = []  # wrap mode: the stream not yet cut into rows
    for docs in _chunks(source.documents(split), _CHUNK_DOCS):
        encoded = tok.encode_batch(docs)
        stats["documents"] += len(docs)
        stats["bytes"] += sum(len(d.encode("utf-8")) for d in docs)
        rows: list[list[int]] = []
        if mode == "wrap":
            for ids in encoded:
                buf.extend(ids)
                buf.append(sp.eos)
            n_full = len(buf) // seq_len
            rows = [buf[i * seq_len : (i + 1) * seq_len] for i in range(n_full)]
            buf = buf[n_full * seq_len :]
        else:
            head = [sp.bos] if sp.bos is not None else []
            for ids in encoded:
                row = [*head, *ids, sp.eos]
                if len(row) > seq_len:
                    stats["truncated_documents"] += 1
                    stats["truncated_tokens"] += len(row) - seq_len
                    row = row[:seq_len]
                rows.append(row)
        w.write(rows)
    if buf:
        w.write([buf])
    out = w.close()
    if w.rows == 0:
        raise DlmError(f"split {split!r} of {source.name} has no documents")
    return {"rows": w.rows, "tokens": w.tokens, **stats, **out}


def prepare(
    source: Source,
    tokenizer_spec: str = "gpt2",
    *,
    seq_len: int = 256,
    mode: str = "wrap",
    dtype: str | None = None,
    out_dir: Path | str | None = None,
    data_root: Path | str = "data",
    tokenizer_from: Path | str | None = None,
    splits: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Tokenize every split of ``source`` into shards; return the data directory.

    Re-running with the same inputs reuses the existing directory (matched by ``inputs_hash``);
    a directory holding different inputs is never overwritten. ``tokenizer_from``: a prepared data directory
    whose trained tokenizer (it must be ``tokenizer_spec``) is used instead of training one on ``source``
    (module docstring); for a fixed tokenizer (bytes, gpt2, ...) only the name is checked. ``splits``: write
    only these splits of the source (e.g. the one a zero-shot evaluation scores); None = all of them. A
    tokenizer that needs training (and is not reused) needs the train split.
    """
    _check_request(seq_len, mode, dtype)
    if splits is not None:
        splits = _check_splits(source, splits)
    reused = None if tokenizer_from is None else load_reused_tokenizer(Path(tokenizer_from), tokenizer_spec)
    if splits is not None and reused is None and needs_training(tokenizer_spec) and "train" not in splits:
        raise DlmError(f"tokenizer {tokenizer_spec} is trained on the train split: include it, or reuse a tokenizer")
    fp = reused[0].fingerprint() if reused else None
    h = inputs_hash(source, tokenizer_spec, seq_len, mode, dtype, fp, splits)
    out = (
        Path(out_dir)
        if out_dir is not None
        else default_data_dir(Path(data_root), source, tokenizer_spec, seq_len, mode, h)
    )
    if _reuse(out, h, log):
        return out
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlmError(f"cannot create {out.parent}: {e.strerror or e}") from None
    try:
        with exclusive_lock(out.parent / f".{out.name}.lock", out):  # one prepare per target at a time
            if _reuse(out, h, log):  # another prepare finished it meanwhile
                return out
            remove_stale_tmp_dirs(out)
            return _prepare_locked(source, tokenizer_spec, h, out, seq_len, mode, dtype, log, reused, splits)
    except BaseException:
        for p in created:  # a failed prepare leaves the tree as it was
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _reuse(out: Path, h: str, log: Callable[[str], None]) -> bool:
    """True when ``out`` is a complete data directory of these inputs (verified); False when it is missing
    or empty; DlmError when it is something else (a file, another directory, other inputs)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DlmError(f"{out} exists and is not a directory; choose another --out")
    if not (out / "meta.json").exists():
        if any(out.iterdir()):
            raise DlmError(f"{out} exists and is not a dlm data directory (no meta.json); choose another")
        return False
    meta = read_meta(out)
    if meta.get("inputs_hash") != h:
        raise DlmError(
            f"{out} holds shards prepared from different inputs "
            f"({meta.get('source', {}).get('spec')}, {meta.get('tokenizer', {}).get('name')}, "
            f"{meta.get('mode')}, L={meta.get('seq_len')}); choose another --out or delete it"
        )
    for split in meta["splits"]:
        open_split(out, split, verify=True)
    log(f"reusing {out} (same inputs, shards verified)")
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp_dirs(out: Path) -> None:
    """Delete ``.NAME.tmp-PID`` directories next to ``out`` left by a killed prepare (PID no longer running;
    called under the target's lock, so no live prepare is writing one)."""
    prefix = f".{out.name}.tmp-"
    for p in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix) :]
        if p.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _prepare_locked(
    source: Source,
    tokenizer_spec: str,
    h: str,
    out: Path,
    seq_len: int,
    mode: str,
    dtype: str | None,
    log: Callable[[str], None],
    reused: tuple[Tokenizer, Path] | None = None,
    only: Sequence[str] | None = None,
) -> Path:
    """Tokenize and write ``out`` (under its lock; ``out`` is missing or an empty directory): the tokenizer
    (``reused``: (tokenizer, its directory) from ``tokenizer_from``), then every split into a temporary
    directory next to ``out``, then meta.json, then one rename."""
    t0 = time.perf_counter()
    tok = reused[0] if reused is not None else _tokenizer(source, tokenizer_spec, log)
    dt = dtype or default_dtype(tok.vocab_size)
    _check_dtype_fits(dt, tok.vocab_size, tok.name)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        tok.save(tmp)
        splits = _write_splits(source, tok, tmp, seq_len, mode, dt, log, only)
        meta = _meta(source, tok, h, seq_len, mode, dt, splits)
        if reused is not None:
            meta["tokenizer"]["from"] = str(reused[1])
        write_json_atomic(tmp / "meta.json", meta)
        if out.exists():
            out.rmdir()  # only reached for an existing empty directory
        os.replace(tmp, out)
    except OSError as e:  # disk full, quota, permissions: one line, nothing half-written left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise DlmError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {out} in {time.perf_counter() - t0:.1f}s")
    return out


def load_reused_tokenizer(data_dir: Path, tokenizer_spec: str) -> tuple[Tokenizer, Path] | None:
    """(the tokenizer of the prepared ``data_dir``, its resolved path), checked to be ``tokenizer_spec`` and to
    load with the fingerprint its meta.json records; None for a fixed tokenizer (nothing to reuse: the same
    everywhere). One-line ``DlmError`` otherwise."""
    meta = read_meta(data_dir)
    name = meta["tokenizer"]["name"]
    if name != tokenizer_spec:
        raise DlmError(f"tokenizer {tokenizer_spec} requested, but {data_dir} was prepared with {name}")
    if not needs_training(tokenizer_spec):
        return None
    tok = load_tokenizer(name, data_dir)
    if tok.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise DlmError(f"the tokenizer files in {data_dir} do not match its meta.json (fingerprints differ)")
    return tok, data_dir.resolve()


def _tokenizer(source: Source, tokenizer_spec: str, log: Callable[[str], None]) -> Tokenizer:
    """The tokenizer ``tokenizer_spec``, trained on the source's train split when it needs training."""
    if needs_training(tokenizer_spec):
        log(f"training tokenizer {tokenizer_spec} on the train split of {source.name}")
        return build_tokenizer(tokenizer_spec, train_texts=source.documents("train"))
    return build_tokenizer(tokenizer_spec)


def _check_splits(source: Source, splits: Sequence[str]) -> list[str]:
    """``splits`` as a list in the source's order; one-line DlmError for an empty list or an unknown split."""
    unknown = [s for s in splits if s not in source.available_splits]
    if unknown or not splits:
        have = ", ".join(source.available_splits)
        raise DlmError(f"{source.name} has no split {', '.join(unknown) or '(none given)'} (it has {have})")
    return [s for s in source.available_splits if s in splits]


def _write_splits(
    source: Source,
    tok: Tokenizer,
    tmp: Path,
    seq_len: int,
    mode: str,
    dt: str,
    log: Callable[[str], None],
    only: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The splits of ``source`` (``only`` these when given) as shards under ``tmp``; their meta.json entries."""
    splits = {}
    for split in only or source.available_splits:
        t_split = time.perf_counter()
        splits[split] = s = _write_split(source, split, tok, tmp, seq_len, mode, dt)
        log(
            f"  {split:<10} {s['documents']:>9,} docs {s['tokens']:>12,} tokens {s['rows']:>9,} rows "
            f"({time.perf_counter() - t_split:.1f}s)"
        )
    return splits


def _meta(
    source: Source, tok: Tokenizer, h: str, seq_len: int, mode: str, dt: str, splits: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """meta.json of a data directory: what it was made from and how, and its splits."""
    return {
        "format_version": FORMAT_VERSION,
        "dlm_version": __version__,
        "inputs_hash": h,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"spec": source.name, "fingerprint": source.fingerprint(), **source.describe()},
        "tokenizer": {
            "name": tok.name,
            "fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "specials": tok.specials.to_dict(),
        },
        "mode": mode,
        "seq_len": seq_len,
        "dtype": dt,
        "layout": (
            "wrap: EOS after every document, documents concatenated and cut into rows of seq_len; "
            "the last row of a split is padded"
            if mode == "wrap"
            else "pad: one document per row, [BOS] doc [EOS] truncated to seq_len, padded with PAD"
        ),
        "bytes_note": "bytes = UTF-8 bytes of the documents' text (separators count 0 bytes)",
        "splits": splits,
    }


# ----------------------------------------------------------------------------- reading


def read_meta(data_dir: Path | str) -> dict[str, Any]:
    p = Path(data_dir) / "meta.json"
    if not p.exists():
        raise DlmError(f"not a prepared data directory (no meta.json): {data_dir}")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DlmError(f"corrupt meta.json in {data_dir}: {e}") from None
    for key in ("format_version", "splits", "seq_len", "dtype", "tokenizer", "mode"):
        if key not in meta:
            raise DlmError(f"meta.json in {data_dir} lacks {key!r}: not a dlm data directory")
    if meta["format_version"] != FORMAT_VERSION:
        raise DlmError(
            f"{data_dir} was prepared with shard format {meta['format_version']}, this dlm reads "
            f"{FORMAT_VERSION}: prepare it again"
        )
    return meta


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardSplit:
    """One split of a data directory, memory-mapped. ``ids`` is [rows, L]; ``lengths`` is [rows]."""

    data_dir: Path
    name: str
    meta: dict[str, Any]
    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    @property
    def specials(self) -> SpecialIds:
        return SpecialIds.from_dict(self.meta["tokenizer"]["specials"])

    @property
    def stats(self) -> dict[str, Any]:
        return self.meta["splits"][self.name]

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.meta["tokenizer"]["name"], self.data_dir)

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``index`` as (int64 ids [n, L], bool mask [n, L])."""
        ids = np.asarray(self.ids[index], dtype=np.int64)
        mask = np.arange(self.seq_len)[None, :] < self.lengths[index][:, None]
        return ids, mask


def open_split(data_dir: Path | str, split: str, verify: bool | None = None) -> ShardSplit:
    """Open a split, checking its files against meta.json.

    Sizes are always checked. ``verify=True`` also checks sha256; ``None`` (default) does so for
    shards under 1 GiB. Any mismatch is a one-line :class:`DlmError` naming the file.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DlmError(f"{data_dir} has no split {split!r} (it has {', '.join(meta['splits'])})")
    s = meta["splits"][split]
    L, np_dtype = int(meta["seq_len"]), DTYPES[meta["dtype"]]
    files = {k: data_dir / v for k, v in s["files"].items()}
    expected = {"ids": s["rows"] * L * np.dtype(np_dtype).itemsize, "lengths": s["rows"] * 4}
    for key, path in files.items():
        if not path.exists():
            raise DlmError(f"shard file missing: {path}")
        size = path.stat().st_size
        if size != expected[key]:
            raise DlmError(
                f"shard {path} is truncated or does not match meta.json: {size} bytes, expected {expected[key]}"
            )
        check_hash = verify or (verify is None and size < VERIFY_FULL_HASH_BELOW)
        if check_hash and _sha256_file(path) != s["sha256"][key]:
            raise DlmError(f"shard {path} is corrupt: its sha256 differs from meta.json")
    if s["rows"] == 0:
        raise DlmError(f"split {split!r} of {data_dir} is empty")
    ids = np.memmap(files["ids"], dtype=np_dtype, mode="r", shape=(s["rows"], L))
    lengths = np.fromfile(files["lengths"], dtype=np.uint32).astype(np.int64)
    if lengths.max() > L or lengths.min() < 1 or int(lengths.sum()) != s["tokens"]:
        raise DlmError(f"shard lengths of split {split!r} in {data_dir} do not match meta.json")
    return ShardSplit(data_dir, split, meta, ids, lengths)
