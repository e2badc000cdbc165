"""The checks of a comparison spec (``CompareSpec.validate``): every bad field is one line naming it, before any
work starts. Kept apart from ``dlm.compare.spec`` (the dataclasses, overrides and files)."""

from __future__ import annotations

import re
from pathlib import Path

from dlm.compare.spec import (
    Arm,
    Budget,
    CompareSpec,
    Corpus,
    Evaluation,
    arm_run_config,
    family_settings,
    judge_run_config,
    known_families,
)
from dlm.config import RunConfig, _require
from dlm.errors import DlmError

__all__ = ["validate_spec"]

_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_spec(spec: CompareSpec) -> CompareSpec:
    """``spec`` when every field is possible; else ``DlmError`` naming the first impossible one."""
    _validate_corpus(spec.corpus)
    if not spec.arms:
        raise DlmError("arms: the arm list is empty; give at least one arm (e.g. family: ar)")
    seen: set[str] = set()
    for i, arm in enumerate(spec.arms):
        if family_settings(arm.family) is None:
            raise DlmError(f"arms.{i}.family: unknown family {arm.family!r} (known: {', '.join(known_families())})")
        if not _ARM_NAME.fullmatch(arm.name):
            raise DlmError(f"arms.{i}.name: {arm.name!r} must be letters, digits, '.', '_' or '-'")
        if arm.name in seen:
            raise DlmError(f"arms.{i}.name: duplicate arm name {arm.name!r}")
        seen.add(arm.name)
        _require(f"arms.{i}.steps", arm.steps, all(s >= 1 for s in arm.steps), "must all be >= 1")
    if not spec.seeds:
        raise DlmError("seeds: the seed list is empty; give at least one seed")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise DlmError(f"seeds: duplicated seed in {list(spec.seeds)}")
    _validate_budget(spec.budget)
    _validate_evaluation(spec.evaluation, spec.corpus)
    _validate_zero_shot(spec.evaluation)
    _validate_suite(spec.evaluation)
    for i, arm in enumerate(spec.arms):
        cfg = arm_run_config(spec, arm, spec.seeds[0])
        _check_samplers(cfg, arm, i, spec.evaluation.samples.steps, spec.corpus)
    if spec.evaluation.evaluator == "judge-ar":
        try:
            judge_run_config(spec)
        except DlmError as e:
            raise DlmError(f"evaluation.judge: {e}") from None
    return spec


def _validate_corpus(c: Corpus) -> None:
    if c.data_dir is not None:
        if not Path(c.data_dir).is_dir():
            raise DlmError(f"corpus.data_dir: {c.data_dir!r} is not a directory")
        return
    from dlm.data.tokenizers import needs_training

    if not c.source.strip():
        raise DlmError("corpus.source: empty; give a corpus (shakespeare, a path, hf:NAME) or corpus.data_dir")
    try:
        needs_training(c.tokenizer)  # raises for an unknown tokenizer spec
    except DlmError as e:
        raise DlmError(f"corpus.tokenizer: {e}") from None
    _require("corpus.seq_len", c.seq_len, c.seq_len >= 2, "must be >= 2")
    bad = [o for o in c.source_options if "=" not in o or not o.split("=", 1)[0].strip()]
    _require("corpus.source_options", list(c.source_options), not bad, "must be KEY=VALUE strings")


def _validate_budget(b: Budget) -> None:
    given = [k for k in ("steps", "tokens", "minutes") if getattr(b, k) is not None]
    if len(given) != 1:
        what = "none is set" if not given else f"{' and '.join(given)} are set"
        raise DlmError(f"budget: set exactly one of budget.steps, budget.tokens, budget.minutes ({what})")
    key = given[0]
    _require(f"budget.{key}", getattr(b, key), getattr(b, key) > 0, "must be > 0")


def _validate_evaluation(e: Evaluation, corpus: Corpus) -> None:
    lk, s, sp = e.likelihood, e.samples, e.speed
    _require("evaluation.likelihood.t_samples", lk.t_samples, lk.t_samples >= 1, "must be >= 1")
    _require("evaluation.likelihood.max_batches", lk.max_batches, lk.max_batches >= 0, "must be >= 0")
    _require("evaluation.samples.n", s.n, s.n >= 1, "must be >= 1")
    _require("evaluation.samples.steps", s.steps, bool(s.steps) and all(v >= 1 for v in s.steps), "must be >= 1")
    _require("evaluation.samples.temperature", s.temperature, s.temperature >= 0, "must be >= 0")
    _require("evaluation.samples.temperatures", s.temperatures, all(t >= 0 for t in s.temperatures), "must be >= 0")
    _require("evaluation.samples.temperatures", s.temperatures, len(set(s.temperatures)) == len(s.temperatures),
             "must not repeat a temperature")  # fmt: skip
    _require("evaluation.samples.batch_size", s.batch_size, s.batch_size >= 1, "must be >= 1")
    _require("evaluation.judge.steps", e.judge.steps, e.judge.steps >= 0, "must be >= 0")
    v = e.variance
    _require("evaluation.variance.batches", v.batches, v.batches == 0 or v.batches >= 2, "must be 0 (off) or >= 2")
    _require("evaluation.variance.t_samples", v.t_samples, v.t_samples >= 2, "must be >= 2")
    _require("evaluation.judge.batch_size", e.judge.batch_size, e.judge.batch_size >= 1, "must be >= 1")
    _require("evaluation.speed.batch_sizes", sp.batch_sizes, all(v >= 1 for v in sp.batch_sizes), "must be >= 1")
    _require("evaluation.speed.repeats", sp.repeats, sp.repeats >= 1, "must be >= 1")
    _require("evaluation.speed.protocol_tokens", sp.protocol_tokens, sp.protocol_tokens >= 0, "must be >= 0")
    ev = e.evaluator
    if ev.startswith("hf:"):
        if not Path(ev[3:]).is_dir():
            raise DlmError(f"evaluation.evaluator: {ev[3:]!r} is not a directory (hf:DIR needs a local causal LM)")
    elif ev == "true-language":
        if corpus.data_dir is None and not corpus.source.startswith("formal"):
            raise DlmError(f"evaluation.evaluator: true-language needs a formal corpus, got {corpus.source!r}")
    elif ev != "judge-ar":
        raise DlmError(f"evaluation.evaluator: expected judge-ar, hf:DIR or true-language, got {ev!r}")


def _validate_zero_shot(e: Evaluation) -> None:
    """Each zero-shot corpus: a unique name, exactly one of source and data_dir, KEY=VALUE source options."""
    seen: set[str] = set()
    for i, z in enumerate(e.zero_shot):
        where = f"evaluation.zero_shot.{i}"
        if not _ARM_NAME.fullmatch(z.name):
            raise DlmError(f"{where}.name: {z.name!r} must be letters, digits, '.', '_' or '-'")
        if z.name in seen:
            raise DlmError(f"{where}.name: duplicate zero-shot corpus name {z.name!r}")
        seen.add(z.name)
        if bool(z.source.strip()) == (z.data_dir is not None):
            raise DlmError(f"{where}: give exactly one of source (a corpus to prepare) and data_dir (a prepared one)")
        if z.data_dir is not None and not Path(z.data_dir).is_dir():
            raise DlmError(f"{where}.data_dir: {z.data_dir!r} is not a directory")
        ok = z.max_batches is None or z.max_batches >= 1
        _require(f"{where}.max_batches", z.max_batches, ok, "must be >= 1 (null: as the likelihood)")
        bad = [o for o in z.source_options if "=" not in o or not o.split("=", 1)[0].strip()]
        _require(f"{where}.source_options", list(z.source_options), not bad, "must be KEY=VALUE strings")


def _validate_suite(e: Evaluation) -> None:
    """evaluation.conditional (when n > 0) and evaluation.downstream (when it lists tasks)."""
    import importlib.util

    c, d = e.conditional, e.downstream
    _require("evaluation.conditional.n", c.n, c.n >= 0, "must be >= 0 (0: off)")
    if c.n:
        if e.evaluator != "judge-ar":
            raise DlmError(f"evaluation.conditional: needs evaluator judge-ar (the AR judge scores continuations), "
                           f"got {e.evaluator!r}")  # fmt: skip
        for key in ("prompt_len", "cont_len", "batch_size"):
            _require(f"evaluation.conditional.{key}", getattr(c, key), getattr(c, key) >= 1, "must be >= 1")
        _require("evaluation.conditional.steps", c.steps, c.steps >= 0, "must be >= 0 (0: the family's default)")
        from dlm.eval.condgen import MODES, PROMPT_FROM

        ok = bool(c.modes) and set(c.modes) <= set(MODES) and len(set(c.modes)) == len(c.modes)
        _require("evaluation.conditional.modes", list(c.modes), ok, f"must be distinct modes of {', '.join(MODES)}")
        ok = c.prompt_from in PROMPT_FROM
        _require("evaluation.conditional.prompt_from", c.prompt_from, ok, f"must be {' or '.join(PROMPT_FROM)}")
        for key in ("seeds", "mauve_seeds"):
            v = getattr(c, key)
            ok = bool(v) and len(set(v)) == len(v) and all(x >= 0 for x in v)
            _require(f"evaluation.conditional.{key}", list(v), ok, "must be distinct seeds >= 0, at least one")
    _require("evaluation.downstream.k", d.k, d.k >= 1, "must be >= 1")
    _require("evaluation.downstream.limit", d.limit, d.limit is None or d.limit >= 1, "must be >= 1 or null")
    if d.task_dir == "auto":  # tasks built from the corpus (dlm.eval.localtasks): only their names may be listed
        from dlm.eval.localtasks import KINDS, task_name

        buildable = [task_name(k) for k in KINDS]
        bad = [t for t in d.tasks if t not in buildable]
        if bad:
            names = ", ".join(buildable)
            raise DlmError(f"evaluation.downstream.tasks: {', '.join(bad)} cannot be built with task_dir auto "
                           f"(it builds {names})")  # fmt: skip
    elif d.task_dir is not None and not Path(d.task_dir).is_dir():
        raise DlmError(f"evaluation.downstream.task_dir: {d.task_dir!r} is not a directory (or auto)")
    if (d.tasks or d.task_dir == "auto") and importlib.util.find_spec("lm_eval") is None:
        raise DlmError("evaluation.downstream: the tasks need lm-eval: pip install 'dlm[lmeval]'")


def _check_samplers(cfg: RunConfig, arm: Arm, i: int, default_steps: tuple[int, ...], corpus: Corpus) -> None:
    """Every sampler of ``arm`` exists for its family, and every step count is within the family's limits for the
    corpus's rows (``max_steps``, ``min_steps``: e.g. a block family needs one step per block)."""
    from dlm.compare.sweep import check_entries
    from dlm.data.specials import SpecialIds
    from dlm.process import get_process

    process = get_process(cfg.process, SpecialIds(bos=0, eos=1, pad=2, mask=8, vocab_size=8))
    check_entries(process, arm.samplers, f"arms.{i}.samplers", arm.family)
    limit = process.max_steps()
    steps = arm.steps or default_steps
    if process.step_sampler and limit is not None and max(steps) > limit:
        where = f"arms.{i}.steps" if arm.steps else f"evaluation.samples.steps (arm {arm.name!r})"
        raise DlmError(f"{where}: step count {max(steps)} exceeds the family's limit {limit} (process.T)")
    if not process.step_sampler or corpus.data_dir is not None:  # a prepared corpus: its row length is checked later
        return
    try:
        floor = process.min_steps(corpus.seq_len)
    except DlmError as e:
        raise DlmError(f"arms.{i} ({arm.name}): {e}") from None
    if min(steps) < floor:
        where = f"arms.{i}.steps" if arm.steps else f"evaluation.samples.steps (arm {arm.name!r})"
        raise DlmError(f"{where}: {min(steps)} steps cannot cover the {floor} blocks of a {corpus.seq_len}-token row")
