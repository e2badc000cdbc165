"""``dlm export RUN DIR``: one checkpoint of a run as a Hugging Face-style model directory.

DIR holds (written by ``huggingface_hub``'s ``PyTorchModelHubMixin.save_pretrained`` through
:class:`PretrainedDlm`, plus the tokenizer and data files)::

    DIR/model.safetensors   the backbone's weights (EMA ones by default), names prefixed ``model.``
    DIR/config.json         format "dlm-export", family (process name), exact_likelihood, process (its settings),
                            model (the ModelConfig), run_config (the whole RunConfig), checkpoint {step, ema,
                            which}, clip_window (BD3-LM: the window it trained with), tokenizer {name, fingerprint,
                            vocab_size, specials, files, hf_tokenizer_json}, source_run, dlm_version
    DIR/tokenizer.json      a true Hugging Face ``tokenizers`` file for gpt2, bert-base-uncased and bpe:N (loads with
                            ``tokenizers.Tokenizer.from_file``; encode with ``add_special_tokens=False`` as dlm does)
    DIR/chars.json          chars: the alphabet (``Tokenizer.save``); bytes has no file: its name rebuilds it
    DIR/data_meta.json      the data directory's meta.json as the run was trained on it
    DIR/README.md           model card: family, checkpoint, model, tokenizer, data, every likelihood result found in
                            RUN/eval (NLL with "=" or "≤", SE, split, step, K), how to load and upload it

``dlm.rundir.load_run(DIR)`` (so ``dlm eval DIR``, ``dlm sample DIR`` and ``dlm.from_pretrained(DIR)``) reads
it back to the same model and process, so the NLL and the samples of a seed are the run's, exactly.
``PretrainedDlm.from_pretrained(DIR)`` (the mixin's loader, local path, offline) gives the same backbone as
``PretrainedDlm(...).model``. Nothing is uploaded: the card names the user's command (``hf upload``).

The write is atomic: everything goes into a temporary directory beside DIR that is renamed to DIR when complete;
a non-empty DIR is refused before anything is written unless ``force``, and then replaced only after the new
directory is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin
from torch import nn

import dlm
from dlm.data.tokenizers import Tokenizer
from dlm.errors import DlmError
from dlm.eval.results import check_writable, find_results
from dlm.eval.run import run_tokenizer
from dlm.io import honour_umask, write_json_atomic, write_text_atomic
from dlm.model import count_params
from dlm.rundir import (
    EXPORT_FORMAT,
    LoadedRun,
    build_export_model,
    export_run_config,
    load_run,
    read_export_config,
    read_run_config,
)

__all__ = ["PretrainedDlm", "export_run", "model_card", "write_tokenizer_files"]

HF_TOKENIZER_FILE = "tokenizer.json"
_CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


class PretrainedDlm(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="dlm",
    tags=["dlm", "discrete-diffusion", "text-generation"],
    model_card_template=_CARD_TEMPLATE,
):
    """The ``huggingface_hub`` face of an exported checkpoint: ``config`` is DIR/config.json, ``model`` the
    backbone (``dlm.rundir.build_export_model``). ``PretrainedDlm.from_pretrained(DIR)`` loads a ``dlm export``
    directory with the mixin's own loader; ``dlm.from_pretrained(DIR)`` gives the model with its process."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.model = build_export_model(export_run_config(config, "config.json"))  # names: EXPORT_PREFIX + ...

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> PretrainedDlm:
        """The mixin's loader, strict by default: a tensor missing from model.safetensors is an error, not a
        randomly initialised weight."""
        return super()._from_pretrained(strict=strict, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def write_tokenizer_files(tok: Tokenizer, directory: Path) -> list[str]:
    """The tokenizer files of ``tok`` in ``directory``; returns their names. ``Tokenizer.save`` first (bpe:N:
    tokenizer.json, the definition ``load_tokenizer`` reads back; chars: chars.json), then for the other
    ``tokenizers``-backed ones (gpt2, bert-base-uncased) their Hugging Face definition as tokenizer.json."""
    before = set(os.listdir(directory))
    tok.save(directory)
    hf = getattr(tok, "_hf", None)  # the tokenizers.Tokenizer behind gpt2, bert-base-uncased and bpe:N
    if hf is not None and not (directory / HF_TOKENIZER_FILE).exists():
        write_text_atomic(directory / HF_TOKENIZER_FILE, hf.to_str())
    return sorted(set(os.listdir(directory)) - before)


def export_config(run: LoadedRun, tok: Tokenizer, run_dir: Path, which: str | int, files: list[str]) -> dict[str, Any]:
    """DIR/config.json (module docstring); ``dlm.rundir.load_run`` reads it back."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "family": run.process.name,
        "exact_likelihood": bool(run.process.exact_likelihood),
        "process": asdict(run.cfg.process),
        "model": asdict(run.cfg.model),
        "run_config": run.cfg.to_dict(),
        "checkpoint": {"step": run.step, "ema": run.ema, "which": str(which)},
        "clip_window": None if run.clip_window_source is None else list(run.process.clip_window),
        "clip_window_source": run.clip_window_source,
        "tokenizer": {
            "name": tok.name,
            "fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "specials": run.data_meta["tokenizer"]["specials"],
            "files": files,
            "hf_tokenizer_json": HF_TOKENIZER_FILE in files,
        },
        "source_run": str(run_dir.resolve()),
        "dlm_version": dlm.__version__,
    }


def _check_target(run_dir: Path, out_dir: Path, force: bool) -> None:
    """Refuse, before anything is written: DIR is a file, DIR is the run or holds it, DIR non-empty without force."""
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or out in run.parents:
        raise DlmError(f"export directory {out_dir} is (or holds) the run directory {run_dir}; choose another one")
    if out_dir.exists() and not out_dir.is_dir():
        raise DlmError(f"export directory {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise DlmError(f"export directory {out_dir} is not empty; use --force to replace it")


def export_run(
    run_dir: str | Path, out_dir: str | Path, which: str | int = "last", ema: bool = True, force: bool = False
) -> Path:
    """Write checkpoint ``which`` ("last", "best" or a step) of the run in ``run_dir`` into ``out_dir`` (module
    docstring), with the EMA weights when ``ema`` and the run kept them; returns ``out_dir``.

    Refused in one line before anything is written: ``run_dir`` not a run directory (or an export), no such
    checkpoint, ``out_dir`` non-empty without ``force`` (or being the run directory). The trained tokenizers
    (chars, bpe:N) are read from the run's data directory and checked against the run's fingerprint.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    read_run_config(run_dir)  # not a run directory, or an export: one line
    _check_target(run_dir, out_dir, force)
    run = load_run(run_dir, which=which, ema=ema)
    tok = run_tokenizer(run)
    check_writable(out_dir.resolve().parent)  # makes the parent: only once the run and its tokenizer are read
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.resolve().parent))
    try:
        files = write_tokenizer_files(tok, tmp)
        config = export_config(run, tok, run_dir, which, files)
        wrapper = PretrainedDlm(config)
        wrapper.model.load_state_dict(run.model.state_dict())
        body = model_card(config, _evaluations(run_dir), run_dir, out_dir, count_params(run.model))
        wrapper.save_pretrained(tmp, config=config, model_card_kwargs={"body": body})
        write_json_atomic(tmp / "data_meta.json", run.data_meta)
        for path in tmp.iterdir():  # safetensors writes 0o600, mkdtemp 0o700: give them the umask's modes
            honour_umask(path)
        honour_umask(tmp, executable=True)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    assert read_export_config(out_dir) is not None
    return out_dir


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the complete ``tmp`` to ``out_dir``; an existing (empty, or forced) ``out_dir`` is moved aside
    first and removed after, and put back if the rename fails."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)


# ----------------------------------------------------------------------------- the model card


def _evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """Every likelihood and zero-shot result of RUN/eval, oldest first."""
    return [rec for kind in ("likelihood", "zeroshot") for _, rec in find_results(run_dir, kind)]


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else f"{x:{spec}}"


def _eval_rows(evals: list[dict[str, Any]], step: int, ema: bool) -> list[str]:
    """One markdown row per result: corpus, split, rows, step, weights, NLL with its label, SE, K, bits/byte,
    tokens; a result of another checkpoint or weights than the exported ones is marked."""
    rows = []
    for r in evals:
        rel = "=" if r.get("exact") else "≤"
        k = "—" if r.get("exact") else str(r.get("process", {}).get("eval_t_samples", "?"))
        other = "" if (r.get("checkpoint_step"), bool(r.get("ema"))) == (step, ema) else " (not the exported weights)"
        corpus = r.get("source", "?") + (" (zero-shot)" if r.get("zero_shot") else "")
        rows.append(
            f"| {corpus} | {r.get('split')} | {'whole' if r.get('whole_split') else r.get('split_rows_evaluated')} "
            f"| {r.get('checkpoint_step')}{other} | {'EMA' if r.get('ema') else 'trained'} "
            f"| {rel} {_fmt(r.get('nll'))} | {_fmt(r.get('nll_se'))} | {k} | {_fmt(r.get('bits_per_byte'), '.3f')} "
            f"| {r.get('tokens', 0):,} |"
        )
    return rows


def model_card(config: dict[str, Any], evals: list[dict[str, Any]], run_dir: Path, out_dir: Path, n_params: int) -> str:
    """The README.md body (below the mixin's YAML header): what the model is, its evaluated numbers (or "no
    evaluation found"), how to load it and how the user uploads it."""
    ckpt, tok, m = config["checkpoint"], config["tokenizer"], config["model"]
    meta = config["run_config"]["data"]
    family, exact = config["family"], config["exact_likelihood"]
    weights = "EMA weights" if ckpt["ema"] else "trained weights"
    lik = "exact likelihood (NLL =)" if exact else "likelihood upper bound (NELBO, NLL ≤)"
    tok_files = ", ".join(tok["files"]) or "none: the name rebuilds it"
    lines = [
        f"# dlm {family} model",
        "",
        f"A **{family}** language model ({lik}) trained with dlm and exported by `dlm export` from the run "
        f"`{run_dir.name}`, checkpoint step {ckpt['step']} ({weights}).",
        "",
        "| | |",
        "|---|---|",
        f"| family | `{family}`; process settings in config.json `process` |",
        f"| backbone | {m['backbone']}: {m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads, context "
        f"{m['context']}, vocabulary {m['vocab_size']}, {n_params:,} parameters |",
        f"| tokenizer | `{tok['name']}` (K = {tok['vocab_size']}); files: {tok_files} |",
        f"| data | `{meta.get('dir')}` (data_meta.json: source, mode, row length) |",
        "",
        "## Evaluation",
        "",
    ]
    if evals:
        lines += [
            "| corpus | split | rows | step | weights | NLL (nats/token) | SE | K | bits/byte | tokens |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *_eval_rows(evals, ckpt["step"], ckpt["ema"]),
            "",
            '"=": the exact NLL; "≤": an upper bound on it (the NELBO) estimated with K Monte-Carlo draws per '
            "sequence; SE: the standard error over sequences. Read from the run's eval/*.json (`dlm eval`).",
        ]
    else:
        lines.append(f"No evaluation found: {run_dir.name}/eval holds no likelihood result (`dlm eval RUN` first).")
    lines += [
        "",
        "## Use",
        "",
        "```",
        f"dlm sample {out_dir} --n 4 --seed 0",
        f"dlm eval {out_dir} --split test     # needs the prepared data directory named above",
        f"python -c \"import dlm; run = dlm.from_pretrained('{out_dir}')\"   # cfg, model, process, step, data_meta",
        "```",
        "",
        "## Upload",
        "",
        "dlm never uploads. To publish this directory on the Hugging Face Hub (after `hf auth login`):",
        "",
        "```",
        f"hf upload USER/REPO {out_dir} .        # older huggingface_hub: huggingface-cli upload USER/REPO {out_dir} .",
        "```",
    ]
    return "\n".join(lines)
