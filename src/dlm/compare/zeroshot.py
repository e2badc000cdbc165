"""Zero-shot corpora of ``dlm compare`` (``evaluation.zero_shot``, issue 15): prepared once with the comparison
corpus's tokenizer, row length and mode, then every run scored on each (``dlm.eval.run.evaluate_run(data=DIR)``:
the same estimator, seed and scored positions as in-domain; ``RUN/eval/zeroshot-*.json``, reused per settings).

A trained tokenizer (``chars``, ``bpe:N``) is not retrained on the zero-shot corpus: it is read from the
comparison's data directory (``dlm.data.shards.prepare(tokenizer_from=)``), so the ids mean what the runs
learned. Only the split that is scored is prepared (``prepare(splits=[split])``). A zero-shot corpus given as a
prepared ``data_dir`` is used as it is; ``evaluate_run`` refuses one with another tokenizer or rows longer than
the model context (one line).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlm.compare.spec import CompareSpec, ZeroShot

__all__ = ["ZEROSHOT_DIR", "evaluate_zero_shot", "prepare_zero_shot", "zero_shot_split"]

ZEROSHOT_DIR = "zeroshot"

Log = Callable[[str], None]


def zero_shot_split(spec: CompareSpec, z: ZeroShot) -> str:
    """The split of ``z`` that is scored: its own, else the likelihood split."""
    return z.split or spec.evaluation.likelihood.split


def prepare_zero_shot(
    root: Path, spec: CompareSpec, data_dir: Path, retire: Callable[[Path, str], None], force: bool, log: Log
) -> dict[str, Path]:
    """name -> prepared directory of every zero-shot corpus (DIR/zeroshot/NAME for a source; reused when it holds
    the same inputs; with ``force`` a directory of other inputs is handed to ``retire`` and prepared again)."""
    from dlm.data.shards import inputs_hash, load_reused_tokenizer, prepare, read_meta
    from dlm.data.sources import get_source

    out: dict[str, Path] = {}
    meta = read_meta(data_dir)
    tok_name, seq_len, mode = meta["tokenizer"]["name"], int(meta["seq_len"]), meta["mode"]
    for z in spec.evaluation.zero_shot:
        if z.data_dir is not None:
            log(f"== zero-shot {z.name}: {z.data_dir} (prepared by the user)")
            out[z.name] = Path(z.data_dir).resolve()
            continue
        target = root / ZEROSHOT_DIR / z.name
        log(f"== zero-shot {z.name}: {z.source}, tokenizer {tok_name} of {data_dir}, rows of {seq_len} -> {target}")
        options = {k.strip(): v for k, v in (o.split("=", 1) for o in z.source_options)}
        source = get_source(z.source, **options)
        if force and (target / "meta.json").is_file():
            reused = load_reused_tokenizer(data_dir, tok_name)
            fp = reused[0].fingerprint() if reused else None
            h = inputs_hash(source, tok_name, seq_len, mode, None, fp, [zero_shot_split(spec, z)])
            if read_meta(target).get("inputs_hash") != h:
                retire(target, "the zero-shot corpus or the comparison's tokenizer changed (--force)")
        parallel = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # nothing forks while preparing (see dlm prepare)
        try:
            out[z.name] = prepare(source, tok_name, seq_len=seq_len, mode=mode, out_dir=target, tokenizer_from=data_dir,
                                  splits=[zero_shot_split(spec, z)], log=log).resolve()  # fmt: skip
        finally:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel if parallel is not None else "false"
    return out


def evaluate_zero_shot(
    run_dir: Path, spec: CompareSpec, dirs: dict[str, Path], device: str, log: Log
) -> list[tuple[str, dict[str, Any], Path]]:
    """(name, record, path) of the run's zero-shot likelihood on each corpus (reused per settings)."""
    from dlm.eval.run import evaluate_run

    out = []
    for z in spec.evaluation.zero_shot:
        split = zero_shot_split(spec, z)
        rec, path = evaluate_run(run_dir, data=dirs[z.name], split=split, max_batches=z.max_batches, device=device)
        rel = "=" if rec["exact"] else "≤"
        se = f" ± {rec['nll_se']:.4f}" if rec.get("nll_se") is not None else ""
        log(f"  zero-shot {z.name} ({rec['split']}): NLL {rel} {rec['nll']:.4f}{se} nats/token, {rec['tokens']} tokens")
        out.append((z.name, rec, path))
    return out
