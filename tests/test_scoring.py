"""One scoring rule for every family (``dlm.process.base.scored_positions``): position 0 of a row is context only
(never noised, masked or resampled, never scored, always shown clean), and every family scores exactly the real
positions 1..L-1. Checked on real prepared data (bytes tokenizer) in wrap and pad mode, with a network double
that records what it is shown; and bits per byte counts the UTF-8 bytes of exactly the scored tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import dlm.process.ar
import dlm.process.d3pm
import dlm.process.mdlm
import dlm.process.sedd  # noqa: F401  (register the families)
from dlm.data.batch import Batch
from dlm.data.loader import Loader
from dlm.data.shards import open_split, prepare
from dlm.data.sources import get_source
from dlm.process import ProcessConfig, get_process
from dlm.process.base import scored_positions
from tests.helpers import write_corpus

FAMILIES = [
    ("ar", {}),
    ("mdlm", {}),
    ("d3pm", {"transition": "absorbing", "T": 10}),
    ("d3pm", {"transition": "uniform", "T": 10}),
    ("sedd", {"transition": "absorbing"}),
    ("sedd", {"transition": "uniform"}),
]
IDS = [f"{n}-{o.get('transition', '')}".rstrip("-") for n, o in FAMILIES]


class Recorder(nn.Module):
    """Network double: fixed random logits per input id (so losses are finite and non-trivial); records every
    input it is shown."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab + 1, vocab, generator=torch.Generator().manual_seed(0)))
        self.seen: list[torch.Tensor] = []

    def forward(self, ids_BL, *, attn="bidirectional", t_B=None, key_mask_BL=None):
        self.seen.append(ids_BL.clone())
        return self.table[ids_BL]


def _short_docs(root: Path) -> Path:
    """A corpus of short paragraphs (one per pad-mode row, so rows end in padding)."""
    import random

    rng = random.Random(4)
    words = "a cat sat on the mat by a tree".split()
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        paras = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(24)]
        (root / f"{split}.txt").write_text("\n\n".join(paras) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scoring")
    quiet = {"log": lambda s: None}
    wrap = prepare(
        get_source(str(write_corpus(root / "c1", n_docs=20))),
        "bytes",
        seq_len=24,
        out_dir=root / "w",
        **quiet,
    )
    pad = prepare(
        get_source(str(_short_docs(root / "c2"))),
        "bytes",
        seq_len=40,
        mode="pad",
        out_dir=root / "p",
        **quiet,
    )
    return {"wrap": wrap, "pad": pad}


def _batches(data_dir: Path, n: int = 3) -> list[Batch]:
    s = open_split(data_dir, "validation")
    out = []
    for i, b in enumerate(Loader(s, 6, shuffle=False, infinite=False)):
        if i == n:
            break
        out.append(b)
    return out


def _process(name: str, opts: dict, vocab: int = 259, **kw):
    from dlm.data.specials import SpecialIds

    sp = SpecialIds(bos=256, eos=257, pad=258, mask=259, vocab_size=vocab)
    return get_process(ProcessConfig(name=name, **opts, **kw), sp)


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_every_family_scores_the_same_tokens(data, mode: str) -> None:
    batches = _batches(data[mode])
    if mode == "pad":  # the test needs rows that hold padding (pad mode) and a BOS at position 0
        assert all(bool((~b.mask_BL).any()) and bool((b.ids_BL[:, 0] == 256).all()) for b in batches)
    else:
        assert bool((batches[0].ids_BL[:, 0] != 256).all())
    counts: dict[str, list[list[int]]] = {}
    losses: dict[str, list[float]] = {}
    for (name, opts), key in zip(FAMILIES, IDS, strict=True):
        proc = _process(name, opts)
        model = Recorder(proc.vocab_size)
        g = torch.Generator().manual_seed(0)
        counts[key] = [proc.nll(model, b, g).tokens_B.tolist() for b in batches]
        losses[key] = [proc.loss(model, b, g)[1]["tokens"] for b in batches]
    expected = [(b.mask_BL.sum(1) - 1).clamp(min=0).tolist() for b in batches]
    assert [scored_positions(b).sum(1).tolist() for b in batches] == expected
    for key in IDS:
        assert counts[key] == expected, key
        assert losses[key] == [float(sum(e)) for e in expected], key


@pytest.mark.parametrize("mode", ["wrap", "pad"])
@pytest.mark.parametrize(("name", "opts"), FAMILIES[1:], ids=IDS[1:])
def test_position_zero_is_never_corrupted(data, mode: str, name: str, opts: dict) -> None:
    """Over many t (training and evaluation draws, t spread over [0, 1] by the antithetic sampler) the network is
    shown x^0 at column 0 and the padding unchanged, while the scored positions do get corrupted."""
    proc = _process(name, opts, eval_t_samples=16)
    model = Recorder(proc.vocab_size)
    g = torch.Generator().manual_seed(1)
    corrupted = 0
    for b in _batches(data[mode], n=2):
        model.seen.clear()
        proc.nll(model, b, g)
        for _ in range(8):
            proc.loss(model, b, g)
        assert len(model.seen) >= 9
        for z in model.seen:
            # a forward over K draws per row: D3PM-uniform stacks each row's draws (row-major), the masked-count
            # estimators (D3PM-absorbing) stack draw by draw; the rows of z are one of the two layouts
            k = z.shape[0] // b.ids_BL.shape[0]
            layouts = [(b.ids_BL.repeat_interleave(k, 0), b.mask_BL.repeat_interleave(k, 0))]
            layouts.append((b.ids_BL.repeat(k, 1), b.mask_BL.repeat(k, 1)))
            x, real = next(
                ((x, r) for x, r in layouts if torch.equal(z[:, 0], x[:, 0]) and torch.equal(z[~r], x[~r])), layouts[0]
            )
            assert torch.equal(z[:, 0], x[:, 0])
            assert torch.equal(z[~real], x[~real])
            corrupted += int((z[:, 1:] != x[:, 1:]).sum())
    assert corrupted > 0


# ---------------------------------------------------------------------------------------------- bits per byte


def test_bits_per_byte_counts_the_bytes_of_the_scored_tokens_pad_mode(tmp_path) -> None:
    """A pad-mode split with known text, bytes counted by hand: rows [BOS] doc [EOS] pad...; the scored tokens are
    the document bytes and the EOS (0 bytes), so the byte count is the documents' 7 + 12 = 19 bytes ("Ça va?":
    Ç is 2 bytes; "Hello there."), and bits per byte = nats / (ln 2 * 19). The old rule (bytes per token of the
    split, BOS included, times the scored tokens) gave 23/21 times more."""
    from dlm.config import load_config
    from dlm.eval.run import SCORED_RULE, evaluate_run
    from dlm.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "validation"):
        (corpus / f"{split}.txt").write_text("A cat sat.\n\nThe mat.\n")
    (corpus / "test.txt").write_text("Ça va?\n\nHello there.\n")
    data = prepare(get_source(str(corpus)), "bytes", seq_len=16, mode="pad", out_dir=tmp_path / "d", log=lambda s: None)
    meta = open_split(data, "test").stats
    assert meta["bytes"] == 19 and meta["tokens"] == 23 and meta["truncated_documents"] == 0  # by hand
    tiny = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context=16"]
    steps = ["--train.device=cpu", "--train.batch_size=2", "--train.max_steps=1", "--train.warmup_steps=1"]
    cfg = load_config(None, [f"--data.dir={data}", *tiny, *steps, "--train.val_every=1", "--train.val_batches=1"])
    train(cfg, tmp_path / "run")
    rec, _ = evaluate_run(tmp_path / "run", split="test")
    assert rec["tokens"] == 21 and rec["bytes"] == 19
    assert rec["scored"] == SCORED_RULE and "1..L-1" in rec["scored"] and "every family" in rec["scored"]
    assert rec["bits_per_byte"] == pytest.approx(rec["nats"] / (math.log(2) * 19), rel=1e-12)
    old = rec["nll"] * 21 / (math.log(2) * 21 * 19 / 23)
    assert rec["bits_per_byte"] == pytest.approx(old * 21 / 23, rel=1e-12)
