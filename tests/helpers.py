"""Small corpora and prepared data directories shared by tests."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the cat sleeps on a warm mat while rain falls over the quiet town and a dog dreams of long "
    "walks by the river where old trees lean toward the water"
).split()


def write_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A directory with train/validation/test files of blank-line separated paragraphs."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_docs), ("validation", max(n_docs // 10, 3)), ("test", max(n_docs // 10, 3))):
        paras = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
            paras.append(" ".join(words).capitalize() + ".")
        (root / f"{split}.txt").write_text("\n\n".join(paras) + "\n")
    return root


def smoke_train(
    tmp_path: Path,
    process_args: list[str],
    *,
    steps: int,
    val_every: int,
    seq_len: int = 24,
    width: int = 32,
    layers: int = 1,
) -> tuple[dict, list[float]]:
    """Train a tiny model through the real trainer on byte-level data; (summary, validation NLLs in order)."""
    import json

    from dlm.config import load_config
    from dlm.data.shards import prepare
    from dlm.data.sources import get_source
    from dlm.train import train

    corpus = write_corpus(tmp_path / "corpus", n_docs=40, seed=1)
    data = prepare(get_source(str(corpus)), "bytes", seq_len=seq_len, out_dir=tmp_path / "data", log=lambda s: None)
    cfg = load_config(
        None,
        [
            f"--data.dir={data}",
            *process_args,
            f"--model.n_layer={layers}",
            f"--model.d_model={width}",
            "--model.n_head=2",
            f"--model.context={seq_len}",
            "--train.device=cpu",
            "--train.batch_size=8",
            f"--train.max_steps={steps}",
            "--train.warmup_steps=5",
            "--train.lr=3e-3",
            f"--train.val_every={val_every}",
            f"--train.ckpt_every={steps}",
            "--train.val_batches=2",
            "--train.log_every=10",
        ],
    )
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, [r["val_nll"] for r in rows if r.get("split") == "validation"]


def tree_state(*paths: Path) -> dict[str, str]:
    """Checksums of every file (and the names of every directory) under ``paths``: compare before and after
    a refused command to prove it left them as they were. A missing path is recorded as missing."""
    import hashlib

    out: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            out[str(root)] = "missing"
            continue
        items = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
        for p in items:
            if p.is_dir():
                out[str(p)] = f"dir {p.stat().st_mode:o}"
            else:
                out[str(p)] = f"{p.stat().st_mode:o} " + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(capsys, argv: list[str], match: str, *watch: Path) -> str:
    """Run ``dlm ARGV`` in-process and assert the house rule for bad input: exit status 2, one line
    ``dlm: error: ...`` on stderr containing ``match``, and every path in ``watch`` unchanged (checksums).
    Returns the error line."""
    from dlm.cli import main

    before = tree_state(*watch)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit status {rc}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlm: error: "), f"not one error line: {err!r}"
    assert match in lines[0], f"{match!r} not in {lines[0]!r}"
    assert tree_state(*watch) == before, "a refused command changed files"
    return lines[0]


def sharp_tiny_model(vocab_size: int, context: int, seed: int = 0):
    """A seeded 1-layer backbone (d 32, 2 heads) in eval mode with its random weights scaled x3, so that its
    distributions are far from uniform (a test of a sampler or an identity then tells the positions apart)."""
    import torch

    from dlm.model import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=vocab_size, context=context, n_layer=1, d_model=32, n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()
