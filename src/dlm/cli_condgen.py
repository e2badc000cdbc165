"""``dlm condgen RUN --judge JUDGE_RUN``: conditional generation scored by an AR judge and MAUVE
(``dlm.eval.condgen``; registered by ``dlm.cli.build_parser`` through :func:`add_commands`).

Parsing imports nothing heavy: torch and the evaluation are imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dlm.errors import DlmError


def int_list(text: str, what: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a one-line DlmError for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DlmError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise DlmError(f"{what} must list at least one integer, got {text!r}")
    return values


def _fmt(agg: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± se`` of an aggregate (``se`` omitted when null); the reason when MAUVE is missing."""
    if agg is None:
        return "-"
    if "missing" in agg:
        return f"missing ({agg['missing']})"
    if agg.get("mean") is None:
        return "-"
    se = agg.get("se")
    return f"{agg['mean']:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def print_condgen(record: dict[str, Any], path: Path) -> None:
    """The short table of one conditional-generation record."""
    s = record["settings"]
    m = record["mauve"]
    print(
        f"{record['family']} {s['mode']}: {s['n_prompts']} prompts of {s['prompt_len']} tokens (from "
        f"{s.get('prompt_from', 'start')} in a document), continuations of "
        f"{s['cont_len']} (rows of {s['gen_length']}), sampler {s['sampler']} steps {s['steps']}, seeds "
        f"{','.join(map(str, s['seeds']))}"
    )
    rows = [
        ("continuation PPL (judge)", _fmt(record["continuation_ppl"], 2)),
        ("human continuation PPL", _fmt(record["human_ppl"], 2)),
        (f"MAUVE (over {m.get('n_mauve_seeds', len(s['mauve_seeds']))} MAUVE seeds)", _fmt(m)),
        ("distinct-2 of continuations", _fmt(record["diversity"]["distinct_2"])),
        ("NFE per sampler call", f"{record['nfe']:.1f}"),
        ("wall s per continuation", f"{record['wall_s_per_continuation']:.4f}"),
    ]
    for label, value in rows:
        print(f"  {label:<34}{value}")
    print(f"-> {path}")


def cmd_condgen(args: argparse.Namespace) -> int:
    from dlm.eval.condgen import condgen_run

    seeds = int_list(args.seeds, "--seeds")
    mauve_seeds = int_list(args.mauve_seeds, "--mauve-seeds")
    record, path = condgen_run(
        args.run,
        args.judge,
        data=args.data,
        split=args.split,
        prompt_len=args.prompt_len,
        cont_len=args.cont_len,
        n_prompts=args.n,
        mode=args.mode,
        sampler=args.sampler,
        steps=args.steps,
        seeds=seeds,
        mauve_seeds=mauve_seeds,
        batch_size=args.batch_size,
        device=args.device,
        force=args.force,
        log=print,
        prompt_from=args.prompt_from,
    )
    print_condgen(record, path)
    return 0


def add_commands(sub: Any) -> None:
    """Register ``dlm condgen`` on the subparsers ``sub`` of ``dlm.cli.build_parser``."""
    pc = sub.add_parser(
        "condgen",
        help="conditional generation: continue held-out prompts, score by an AR judge and MAUVE -> RUN/eval/",
        description="Take N prompts of P tokens from documents of a held-out split (a seeded window anywhere in "
        "each, or its start), let the run continue each by C tokens (gen-c: rows of P + C, 1 + P + C with the "
        "boundary of --prompt-from start; keep-c: rows of the model context, first C kept), and score the "
        "continuations: perplexity under the judge given the prompt, diversity, and MAUVE against the human "
        "continuations on the judge's hidden states (needs the mauve extra). Writes "
        "RUN/eval/condgen-{mode}-step{N}-{hash}.json; the same settings reuse it.",
    )
    pc.add_argument("run", type=Path, help="run directory (any family)")
    pc.add_argument("--judge", type=Path, required=True, help="an AR run trained with the same tokenizer")
    pc.add_argument("--prompt-len", type=int, default=50, help="prompt tokens P (default 50)")
    pc.add_argument("--cont-len", type=int, default=50, help="continuation tokens C (default 50)")
    pc.add_argument("--n", type=int, default=32, help="number of prompts N (default 32)")
    pc.add_argument("--mode", default="gen-c", help="gen-c (default): generate P + C; keep-c: generate L, keep C")
    pc.add_argument(
        "--prompt-from",
        default="anywhere",
        help="anywhere (default): each prompt a seeded window inside its document, nothing in front; start: each "
        "document's first P tokens after the document boundary",
    )
    pc.add_argument("--seeds", default="0", help="sampling seeds, comma-separated (default 0)")
    pc.add_argument("--mauve-seeds", default="0,1,2", help="MAUVE k-means seeds (default 0,1,2)")
    pc.add_argument("--sampler", default=None, help="a sampler of the run's family (default: its default)")
    pc.add_argument("--steps", type=int, default=None, help="denoising steps (diffusion; default: one per position)")
    pc.add_argument("--split", default="test", help="split the prompts come from (default test)")
    pc.add_argument("--data", default=None, metavar="DIR", help="another prepared corpus with the run's tokenizer")
    pc.add_argument("--batch-size", type=int, default=16, help="prompts per sampler call (diffusion; default 16)")
    pc.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    pc.add_argument("--force", action="store_true", help="recompute a record RUN/eval already holds")
    pc.set_defaults(func=cmd_condgen)
