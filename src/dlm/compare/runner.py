"""``dlm compare``: train every arm x seed of a spec on one corpus and budget, evaluate each run, aggregate, report.

Stages, each reading what the one before wrote (docs/COMPARE.md has the files):

    1. data      DIR/data prepared from ``spec.corpus`` (reused when it holds the same inputs), or corpus.data_dir;
                 each zero-shot corpus into DIR/zeroshot/NAME with that corpus's tokenizer (``compare.zeroshot``)
    2. judge     evaluator judge-ar: one AR run DIR/judge (``evaluation.judge``), trained once, its likelihood
    3. train     every (arm, seed) in spec order: missing = train, partial = ``train --resume``, finished = skip
    4. evaluate  per run: likelihood (exact / bound), zero-shot likelihood on each zero-shot corpus, samples per
                 sampler x step count x temperature (``compare.sweep``), their quality (gen PPL by the
                 evaluator, diversity; TER/SER on a formal corpus), estimator variances (when
                 evaluation.variance.batches > 0), sampling speed (the first seed's run; plain samplers)
    5. results   DIR/results.json and DIR/results.csv (``dlm.compare.results``)
    6. report    DIR/report.md, DIR/report.html, DIR/figures/ (``dlm.compare.report``)

Every evaluation file is named by its settings (``dlm.eval.results``), so a rerun reuses what is there and a
changed spec never mixes with old numbers. After ``--force`` with another spec, a run directory whose stored
configuration or data differs from its arm's new one, or which trained past a steps budget, is moved to
DIR/replaced/ (nothing is deleted) and trained again; the same for DIR/data when the corpus changed.

Progress: one line per stage and run (``[3/8] arm mdlm seed 0: train from scratch | elapsed 1m02s | ETA ~3m``)
with the trainer's own progress line below it. The ETA extrapolates this invocation's measured seconds per
training step and per evaluated run to what is left; before the first run finishes it is unknown.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlm.compare.spec import Arm, CompareSpec, arm_run_config, judge_run_config, source_options
from dlm.compare.state import CompareDir, RunState, open_compare_dir, run_state
from dlm.compare.sweep import SampleSetting, sweep_settings, temperatures
from dlm.config import RunConfig
from dlm.errors import DlmError

__all__ = ["RunRecord", "run_compare", "sampler_settings"]

REPLACED_DIR = "replaced"
JUDGE_DIR = "judge"

Log = Callable[[str], None]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclasses.dataclass
class RunRecord:
    """What the evaluation of one (arm, seed) run produced: (record, path) pairs of its result files."""

    arm: str
    family: str
    seed: int
    run_dir: Path
    likelihood: tuple[dict[str, Any], Path] | None = None
    samples: list[tuple[dict[str, Any], Path, dict[str, Any], Path]] = dataclasses.field(default_factory=list)
    speed: tuple[dict[str, Any], Path] | None = None
    variance: tuple[dict[str, Any], Path] | None = None
    zero_shot: list[tuple[str, dict[str, Any], Path]] = dataclasses.field(default_factory=list)
    condgen: list[tuple[str, dict[str, Any], Path]] = dataclasses.field(default_factory=list)
    downstream: tuple[dict[str, Any], Path] | None = None


@dataclasses.dataclass
class _Clock:
    """This invocation's measured rates, for the ETA line."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    train_s: float = 0.0
    train_steps: int = 0
    eval_s: float = 0.0
    eval_runs: int = 0

    def eta(self, steps_left: int, evals_left: int) -> str:
        """``ETA ~4m10s``; the parts not measured yet (no run trained / evaluated in this invocation) are named."""
        total, unknown = 0.0, []
        if steps_left:
            if self.train_steps:
                total += steps_left * self.train_s / self.train_steps
            else:
                unknown.append("training")
        if evals_left:
            if self.eval_runs:
                total += evals_left * self.eval_s / self.eval_runs
            else:
                unknown.append("evaluation")
        if not unknown:
            return f"ETA ~{_duration(total)}"
        what = " and ".join(unknown)
        return f"ETA ~{_duration(total)} + {what} (not measured yet)" if total else f"ETA: {what} not measured yet"

    def elapsed(self) -> str:
        return _duration(time.perf_counter() - self.start)


def _budget_steps(cfg: RunConfig, seq_len: int) -> int:
    """The steps a run of ``cfg`` takes in total (tokens budget: ceil(tokens / tokens per step), one rank)."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    if t.max_tokens > 0:
        return math.ceil(t.max_tokens / (t.batch_size * seq_len))
    return 0


def _retire(cdir: CompareDir, path: Path, why: str, log: Log) -> None:
    """Move ``path`` to DIR/replaced/{name}-{time} (nothing is deleted)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = cdir.root / REPLACED_DIR / f"{path.name}-{stamp}"
    k = 1
    while target.exists():
        k += 1
        target = cdir.root / REPLACED_DIR / f"{path.name}-{stamp}.{k}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    log(f"moved {path} to {target}: {why}")


# ----------------------------------------------------------------------------- 1. data


def _prepare_data(cdir: CompareDir, force: bool, log: Log) -> Path:
    from dlm.data.shards import inputs_hash, prepare, read_meta
    from dlm.data.sources import get_source

    c = cdir.spec.corpus
    if c.data_dir is not None:
        log(f"== data: {c.data_dir} (prepared by the user)")
        return Path(c.data_dir).resolve()
    log(f"== data: {c.source}, tokenizer {c.tokenizer}, rows of {c.seq_len} ({c.mode}) -> {cdir.data_dir}")
    source = get_source(c.source, **source_options(c))
    out = cdir.data_dir
    h = inputs_hash(source, c.tokenizer, c.seq_len, c.mode, None)
    if force and (out / "meta.json").is_file() and read_meta(out).get("inputs_hash") != h:
        _retire(cdir, out, "the spec's corpus changed (--force)", log)
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # nothing forks while preparing (see dlm prepare)
    try:
        return prepare(source, c.tokenizer, seq_len=c.seq_len, mode=c.mode, out_dir=out, log=log).resolve()
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = parallel if parallel is not None else "false"


# ----------------------------------------------------------------------------- 2./3. training


def _stale(run_dir: Path, cfg: RunConfig, data_dir: Path) -> str | None:
    """Why an existing run directory cannot continue as this arm's run (None: it can)."""
    from dlm.data.shards import read_meta
    from dlm.rundir import CONFIG_FILE, list_checkpoints, read_run_config, read_run_info
    from dlm.train.setup import check_resumable

    if not (run_dir / CONFIG_FILE).is_file():
        return None
    try:
        check_resumable(read_run_config(run_dir), cfg, run_dir)
        info = read_run_info(run_dir) if (run_dir / "run.json").is_file() else {}
        trained_on = info.get("data_meta", {}).get("inputs_hash")
    except DlmError as e:
        return str(e)
    if trained_on is not None and trained_on != read_meta(data_dir).get("inputs_hash"):
        return "it was trained on other data"
    ckpts = list_checkpoints(run_dir)
    if cfg.train.max_steps > 0 and ckpts and ckpts[-1][0] > cfg.train.max_steps:
        return f"it trained {ckpts[-1][0]} steps, past the budget of {cfg.train.max_steps}"
    return None


def _remaining_minutes(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """A minutes budget spans every session of a run: a resumed run gets the budget less the wall time its last
    checkpoint records (``elapsed``, over all sessions), so an interruption never buys it extra time."""
    from dlm.rundir import list_checkpoints, read_info

    ckpts = list_checkpoints(run_dir)
    if cfg.train.time_limit_min is None or not ckpts:
        return cfg
    spent = float(read_info(ckpts[-1][1]).get("elapsed") or 0.0) / 60
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))
    cfg.train.time_limit_min = max(cfg.train.time_limit_min - spent, 1e-3)
    return cfg


def _train_one(cfg: RunConfig, run_dir: Path, state: RunState, clock: _Clock, log: Log) -> None:
    from dlm.train import train

    if state.status == "partial":
        cfg = _remaining_minutes(cfg, run_dir)
    t0 = time.perf_counter()
    # SIGINT / SIGTERM: train checkpoints the current step and raises TrainingInterrupted, which ends the
    # comparison (the lock is released on the way out); `dlm compare` says how to resume and exits 128 + signal
    summary = train(cfg, run_dir, resume=state.status == "partial")
    clock.train_s += time.perf_counter() - t0
    clock.train_steps += max(0, int(summary["step"]) - state.step)
    if summary.get("stopped") == "time_limit":
        log(f"  {run_dir.name}: the minutes budget ended the run at step {summary['step']}")


def _train_judge(cdir: CompareDir, data_dir: Path, clock: _Clock, force: bool, log: Log) -> Path:
    cfg = judge_run_config(cdir.spec, str(data_dir))
    run_dir = cdir.root / JUDGE_DIR
    if (why := _stale(run_dir, cfg, data_dir)) is not None:
        if not force:
            raise DlmError(f"{run_dir} cannot serve as this spec's judge ({why}); use --force or another --out")
        _retire(cdir, run_dir, why, log)
    state = run_state(run_dir, cfg, "judge", cfg.train.seed)
    m = cfg.model
    size = f"{m.n_layer} layers, d={m.d_model}"
    if state.status == "finished":
        log(f"== judge: AR ({size}) finished at step {state.step}: {run_dir}")
    else:
        log(f"== judge: AR ({size}), {state.line().split(': ', 1)[1]} -> {run_dir}")
        _train_one(cfg, run_dir, state, clock, log)
    return run_dir


def _train_all(cdir: CompareDir, data_dir: Path, clock: _Clock, force: bool, log: Log) -> list[RunState]:
    spec = cdir.spec
    plan = cdir.plan()
    configs = {(s.arm, s.seed): arm_run_config(spec, spec.arm(s.arm), s.seed, str(data_dir)) for s in plan}
    for s in plan:
        run_dir = cdir.run_dir(s.arm, s.seed)
        if (why := _stale(run_dir, configs[s.arm, s.seed], data_dir)) is not None:
            if not force:
                raise DlmError(f"{run_dir} does not match its arm in the spec ({why}); use --force or another --out")
            _retire(cdir, run_dir, why, log)
    plan = cdir.plan()
    seq_len = spec.corpus.seq_len
    for k, s in enumerate(plan, 1):
        cfg = configs[s.arm, s.seed]
        left = sum(max(0, _budget_steps(configs[r.arm, r.seed], seq_len) - r.step) for r in plan[k - 1 :])
        evals = len(plan)
        head = f"== [{k}/{len(plan)}] {s.line()} | elapsed {clock.elapsed()} | {clock.eta(left, evals)}"
        log(head)
        if s.status != "finished":
            _train_one(cfg, cdir.run_dir(s.arm, s.seed), s, clock, log)
    return cdir.plan()


# ----------------------------------------------------------------------------- 4. evaluation


def sampler_settings(cfg: RunConfig, arm: Arm, samples: Any) -> list[SampleSetting]:
    """The sweep of ``arm`` (``dlm.compare.sweep.sweep_settings``): its sampler entries (default: the family's
    default sampler) x step counts (the arm's, else ``samples.steps``) x ``samples``' temperatures."""
    from dlm.data.specials import SpecialIds
    from dlm.process import get_process

    process = get_process(cfg.process, SpecialIds(bos=0, eos=1, pad=2, mask=8, vocab_size=8))
    return sweep_settings(process, arm.samplers, arm.steps or samples.steps, temperatures(samples))


def _speed_settings(settings: list[SampleSetting]) -> list[tuple[str | None, int | None]]:
    """The (sampler, steps) pairs the speed stage times: plain entries only (no sampler options), once each
    (the temperature does not change the work)."""
    return list(dict.fromkeys((s.sampler, s.steps) for s in settings if s.plain))


def _device(spec: CompareSpec) -> str:
    import torch

    d = spec.evaluation.device
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cuda" and not torch.cuda.is_available():
        raise DlmError("evaluation.device: cuda requested but CUDA is not available")
    return d


def _hf_judge(spec: CompareSpec, out: Path, device: str) -> Any:
    """evaluator hf:DIR: the judge loaded before DIR is touched (not a causal LM, no tokenizer: one line, nothing
    written), and probed on the corpus when its data directory already exists (``_probe_hf``)."""
    from dlm.eval.hfjudge import HFJudge

    judge = HFJudge.from_dir(Path(spec.evaluation.evaluator[3:]), None, device=device,
                             batch_size=spec.evaluation.judge.batch_size)  # fmt: skip
    data = Path(spec.corpus.data_dir) if spec.corpus.data_dir else out / "data"
    if (data / "meta.json").is_file():
        _probe_hf(judge, data)
    return judge


def _probe_hf(judge: Any, data_dir: Path) -> None:
    """Give the HF judge the arms' tokenizer and check that it can represent the corpus: the text of the first
    validation rows must survive its retokenisation (else one line: the judge cannot decode the arms' text)."""
    from dlm.data.shards import open_split, read_meta
    from dlm.data.tokenizers import load_tokenizer

    meta = read_meta(data_dir)
    judge.arm_tokenizer = load_tokenizer(meta["tokenizer"]["name"], data_dir)
    split = "validation" if "validation" in meta["splits"] else next(iter(meta["splits"]))
    rows = open_split(data_dir, split)
    for i in range(min(4, len(rows))):
        ids = [int(t) for t in rows.ids[i, : int(rows.lengths[i])]]
        try:
            judge.retokenise(i, ids)
        except DlmError as e:
            raise DlmError(f"evaluation.evaluator: {e} (corpus {split} row {i})") from None


def _evaluator_factory(cdir: CompareDir, judge_dir: Path | None, hf_judge: Any, device: str) -> Callable[[Path], Any]:
    """run_dir -> the evaluator of its samples (built once for a judge, per run for the true language)."""
    from dlm.compare import evaluate

    ev, j = cdir.spec.evaluation.evaluator, cdir.spec.evaluation.judge
    if ev == "true-language":
        return lambda run_dir: evaluate.TrueLanguageEvaluator(run_dir)
    if ev == "judge-ar":
        assert judge_dir is not None
        judge = evaluate.judge_from_run(judge_dir, device=device, batch_size=j.batch_size)
    else:
        judge = evaluate.JudgeEvaluator(hf_judge, hf_judge.info())
    return lambda run_dir: judge


@dataclasses.dataclass
class _Inputs:
    """What every run's evaluation reads besides its own directory."""

    evaluator: Callable[[Path], Any]
    device: str
    zdirs: dict[str, Path]
    judge_dir: Path | None
    tasks: tuple[list[str], Path | None] | None = None  # downstream task names and directory (suite.resolve_tasks)


def _evaluate_run(cdir: CompareDir, s: RunState, inputs: _Inputs, log: Log) -> RunRecord:
    from dlm.compare.evaluate import quality_set, sample_set
    from dlm.compare.speedset import speed_set
    from dlm.eval.progress import Progress
    from dlm.eval.run import evaluate_run

    spec, ev = cdir.spec, cdir.spec.evaluation
    evaluator, device, zdirs = inputs.evaluator, inputs.device, inputs.zdirs
    arm = spec.arm(s.arm)
    run_dir = cdir.run_dir(s.arm, s.seed)
    rec = RunRecord(s.arm, arm.family, s.seed, run_dir)
    rec.likelihood = evaluate_run(run_dir, device=device, log=log, progress=Progress("  likelihood", "batches"))
    lk = rec.likelihood[0]
    rel = "=" if lk["exact"] else "≤"
    se = f" ± {lk['nll_se']:.4f}" if lk["nll_se"] is not None else ""
    log(f"  likelihood ({lk['split']}): NLL {rel} {lk['nll']:.4f}{se} nats/token, BPT {lk['bpt']:.3f}")
    if zdirs:
        from dlm.compare.zeroshot import evaluate_zero_shot

        rec.zero_shot = evaluate_zero_shot(run_dir, spec, zdirs, device, log)
    cfg = arm_run_config(spec, arm, s.seed)
    _evaluate_suite(rec, cfg, spec, inputs, log)
    settings = sampler_settings(cfg, arm, ev.samples)
    sm = ev.samples
    for st in settings:
        srec, spath = sample_set(
            run_dir, sampler=st.sampler, steps=st.steps, n=sm.n, seed=sm.seed, temperature=st.temperature,
            batch_size=sm.batch_size, device=device, options=dict(st.options), label=st.label,
        )  # fmt: skip
        qrec, qpath = quality_set(spath, evaluator=evaluator(run_dir))
        rec.samples.append((srec, spath, qrec, qpath))
        log("  " + _quality_line(srec.get("label") or srec["sampler"], st.steps, srec, qrec))
    if ev.variance.batches:
        from dlm.eval.variance import variance_run

        v = ev.variance
        rec.variance = variance_run(run_dir, batches=v.batches, split=ev.likelihood.split, t_samples=v.t_samples,
                                    seed=0, device=device)  # fmt: skip
        vr = rec.variance[0]
        log(f"  variance: likelihood estimator {vr['seq_var_per_token']:.4g} (nats/token)^2 per sequence, "
            f"gradient (eq. 9) {vr['grad_var']:.4g} over {v.batches} batches")  # fmt: skip
    if s.seed == spec.seeds[0]:
        sp = ev.speed
        rec.speed = speed_set(
            run_dir, settings=_speed_settings(settings), batch_sizes=list(sp.batch_sizes), repeats=sp.repeats,
            protocol_tokens=sp.protocol_tokens, device=device, log=lambda m: log("  " + m),
        )  # fmt: skip
    return rec


def _evaluate_suite(rec: RunRecord, cfg: RunConfig, spec: CompareSpec, inputs: _Inputs, log: Log) -> None:
    """Conditional generation and downstream tasks of one run (``dlm.compare.suite``), when the spec asks."""
    from dlm.compare import suite

    if spec.evaluation.conditional.n:
        assert inputs.judge_dir is not None  # the spec requires evaluator judge-ar
        rec.condgen = suite.condgen_stage(rec.run_dir, cfg, spec, inputs.judge_dir, inputs.device, log)
    if inputs.tasks is not None:
        rec.downstream = suite.downstream_stage(rec.run_dir, spec, inputs.tasks, inputs.device, log)


def _quality_line(sampler: str, steps: int | None, srec: dict[str, Any], qrec: dict[str, Any]) -> str:
    at = f"{sampler}" + (f" {steps} steps" if steps is not None else "")
    at += f" T={srec['temperature']:g}" if srec.get("temperature", 1.0) != 1.0 else ""
    parts = [f"samples {at}: n={srec['n']}, NFE {srec['nfe']:.0f}, {srec['wall_s_per_sequence']:.3f} s/sequence"]
    g, d, f = qrec.get("gen_ppl"), qrec.get("diversity"), qrec.get("formal")
    if g:
        ppl = g["gen_ppl_seq_mean"]
        parts.append(f"gen PPL {ppl:.2f}" if ppl is not None else "gen PPL overflow")
    if f:
        parts.append(f"TER {f['ter']:.4f}, SER {f['ser']:.4f}" if f.get("ter") is not None else "TER undefined")
    if d:
        parts.append(f"entropy {d['entropy_mean']:.3f} nats")
    return " | ".join(parts)


def _evaluate_all(cdir: CompareDir, plan: list[RunState], inputs: _Inputs, clock: _Clock, log: Log) -> list[RunRecord]:
    out = []
    for k, s in enumerate(plan, 1):
        log(f"== evaluate [{k}/{len(plan)}] arm {s.arm} seed {s.seed} | elapsed {clock.elapsed()} | "
            f"{clock.eta(0, len(plan) - k + 1)}")  # fmt: skip
        t0 = time.perf_counter()
        out.append(_evaluate_run(cdir, s, inputs, log))
        clock.eval_s += time.perf_counter() - t0
        clock.eval_runs += 1
    return out


# ----------------------------------------------------------------------------- the command


def run_compare(
    spec: CompareSpec, out: str | Path, *, force: bool = False, log: Log = print, report: bool = True
) -> dict[str, Any]:
    """Run (or resume) the comparison ``spec`` in ``out`` (module docstring); returns results.json's content."""
    from dlm.compare.results import write_results

    clock = _Clock()
    wall: dict[str, float] = {}
    device = _device(spec)
    hf_judge = _hf_judge(spec, Path(out), device) if spec.evaluation.evaluator.startswith("hf:") else None
    with open_compare_dir(out, spec, force=force) as cdir:
        t = time.perf_counter()
        data_dir = _prepare_data(cdir, force, log)
        zdirs: dict[str, Path] = {}
        if spec.evaluation.zero_shot:
            from dlm.compare.zeroshot import prepare_zero_shot

            def retire(path: Path, why: str) -> None:
                _retire(cdir, path, why, log)

            zdirs = prepare_zero_shot(cdir.root, spec, data_dir, retire, force, log)
        if hf_judge is not None and hf_judge.arm_tokenizer is None:
            _probe_hf(hf_judge, data_dir)
        wall["data"] = time.perf_counter() - t
        t = time.perf_counter()
        judge_dir = None
        if spec.evaluation.evaluator == "judge-ar":
            judge_dir = _train_judge(cdir, data_dir, clock, force, log)
        plan = _train_all(cdir, data_dir, clock, force, log)
        wall["train"] = time.perf_counter() - t
        t = time.perf_counter()
        judge_likelihood = None
        if judge_dir is not None:
            from dlm.eval.run import evaluate_run

            log("== judge likelihood")
            judge_likelihood = evaluate_run(judge_dir, device=device, log=log)
        evaluator = _evaluator_factory(cdir, judge_dir, hf_judge, device)
        from dlm.compare.suite import resolve_tasks

        tasks = resolve_tasks(cdir.root, spec, data_dir, log)
        records = _evaluate_all(cdir, plan, _Inputs(evaluator, device, zdirs, judge_dir, tasks), clock, log)
        wall["evaluate"] = time.perf_counter() - t
        wall["total"] = time.perf_counter() - clock.start
        results = write_results(cdir, data_dir, records, judge_dir, judge_likelihood, wall, device, zdirs)
        if report:
            from dlm.compare.report import build_report, summary_lines

            paths = build_report(cdir.root)
            for line in summary_lines(results):
                log(line)
            log(f"report: {paths['html']} (and {paths['md']}); results: {cdir.root / 'results.json'}")
        log(f"done in {clock.elapsed()}")
    return results
