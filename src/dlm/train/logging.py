"""Training logs: RUN/metrics.jsonl, a one-line progress display, optional TensorBoard and W&B (offline).

metrics.jsonl holds one JSON object per line. Training lines:
    {"step", "tokens", "epoch", "loss", "lr", "grad_norm", "tok_s", "mfu", "elapsed", "skipped"}
``tokens`` counts token positions processed so far (rows x seq_len over all micro-batches and ranks,
padding included); ``loss`` is that step's training loss averaged over micro-batches and ranks; ``tok_s``
is measured over the window since the previous line; ``mfu`` = tok_s x training FLOPs per token
(dlm.model.flops_per_token) / (peak bf16 FLOP/s x ranks), null where the peak is unknown (CPU, unlisted
GPUs); ``elapsed`` is wall seconds over all sessions of the run; ``skipped`` counts the steps skipped so
far for a non-finite loss or gradient, and such a step's own line has ``"nonfinite": true`` and null
loss / grad_norm. Validation lines (NLL per token over the fixed validation batches, EMA weights when
``ema`` is true):
    {"step", "split": "validation", "val_nll", "val_bpt", "val_ppl", "val_tokens", "exact", "ema", "elapsed"}
With ``process.clip_search`` (BD3-LM's data-driven clipped schedule) each validation is followed by one line
    {"step", "split": "clip_search", "windows": [[beta, omega, variance], ...], "chosen": [beta, omega]}
``variance`` is the variance over the validation batches of the training loss under mask rates U[beta, omega]
(``dlm.train.loop.clip_search``); ``chosen`` (the least) is the training window from step ``step`` + 1 on.
Non-finite floats are written as null, so every line is strict JSON (written with allow_nan=False).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import IO, Any

from dlm.io import json_line, write_text_atomic
from dlm.rundir import METRICS_FILE, read_jsonl


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines with step <= ``step`` (resuming from that checkpoint); atomic rewrite."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    write_text_atomic(path, "".join(json_line(r) + "\n" for r in kept))


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(record: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    """``step 120/1000 | loss 3.2140 | lr 1.00e-03 | gnorm 0.84 | 12.3k tok/s | mfu 31.2% | eta 4m12s``."""
    parts = [f"step {record['step']}/{total_steps}"]
    loss = record.get("loss")
    parts.append(f"loss {loss:.4f}" if loss is not None else "loss nan (skipped)")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.2f}")
    if record.get("tok_s") is not None:
        parts.append(f"{_fmt_count(record['tok_s'])} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {_fmt_time(eta_s)}")
    return " | ".join(parts)


class RunLogger:
    """Rank 0's sinks: metrics.jsonl (always), stdout progress, TensorBoard and W&B when enabled.

    On a TTY the progress line is redrawn in place (carriage return); otherwise a plain line is printed
    for every logged step.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        tensorboard: bool = False,
        wandb: bool = False,
        stream: IO[str] | None = None,
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_line = False
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                self.note("train.tensorboard: tensorboard is not installed; logging to metrics.jsonl only")
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                self.note("train.wandb: wandb is not installed; logging to metrics.jsonl only")
            else:
                self.wandb = wb.init(mode="offline", dir=str(run_dir), config=config, name=run_dir.name)

    def write(self, record: dict[str, Any]) -> None:
        """Append one metrics line (flushed, so a killed run leaves only complete lines but the last)."""
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json_line(record) + "\n")
        self.file.flush()
        step = record["step"]
        prefix = "val/" if record.get("split") == "validation" else "train/"
        scalars = {
            prefix + k: v
            for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def progress(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self._open_line = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line (validation results, checkpoints, warnings)."""
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
