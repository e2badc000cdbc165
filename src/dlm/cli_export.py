"""``dlm export RUN DIR``: a run's checkpoint as a Hugging Face-style directory (registered by
``dlm.cli.build_parser`` through :func:`add_commands`).

Parsing imports nothing heavy: :mod:`dlm.export` (torch, huggingface_hub) is imported when the command runs, and
a missing ``huggingface_hub`` is one line naming what to install.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from dlm.cli_compare import checkpoint_arg
from dlm.errors import DlmError

_MISSING_HUB = "dlm export needs the package huggingface_hub: pip install 'dlm[export]'"


def export_module() -> ModuleType:
    """:mod:`dlm.export`; DlmError naming the package to install when huggingface_hub is missing."""
    try:
        import dlm.export as export
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] == "huggingface_hub":
            raise DlmError(_MISSING_HUB) from None
        raise
    return export


def cmd_export(args: argparse.Namespace) -> int:
    export = export_module()
    out = export.export_run(
        args.run, args.dir, which=checkpoint_arg(args.checkpoint), ema=not args.no_ema, force=args.force
    )
    config = json.loads((out / "config.json").read_text())
    ckpt = config["checkpoint"]
    files = sorted(p.name for p in out.iterdir())
    print(
        f"exported {config['family']} run {args.run}, step {ckpt['step']} "
        f"({'EMA' if ckpt['ema'] else 'trained'} weights) -> {out}: {', '.join(files)}"
    )
    print(f"load it with dlm sample/eval {out} or dlm.from_pretrained('{out}'); upload: hf upload USER/REPO {out} .")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``export`` on the ``dlm`` subparsers."""
    pe = sub.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face-style directory (safetensors, config, tokenizer, card)",
        description="Write checkpoint --checkpoint of RUN into DIR: model.safetensors, config.json (family, process "
        "settings, model config), the tokenizer files (tokenizer.json for gpt2, bert-base-uncased and bpe:N), "
        "data_meta.json and a README.md model card with the run's evaluated NLL. dlm eval DIR and dlm sample DIR "
        "reproduce the run's numbers. Nothing is uploaded (the card shows the hf upload command).",
    )
    pe.add_argument("run", type=Path, help="run directory")
    pe.add_argument("dir", type=Path, help="output directory (absent or empty; --force replaces it)")
    pe.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    pe.add_argument("--no-ema", action="store_true", help="export the trained weights even if an EMA exists")
    pe.add_argument("--force", action="store_true", help="replace a non-empty DIR (after the new one is complete)")
    pe.set_defaults(func=cmd_export)
