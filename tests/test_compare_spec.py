"""The comparison spec: presets load, every arm x seed resolves to a validated run config, overrides, refusals,
and a hash that is stable across dump/load and changes with any field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dlm.compare import (
    CompareSpec,
    arm_run_config,
    available_compare_presets,
    dump_spec,
    known_families,
    load_compare_spec,
    spec_from_dict,
    spec_hash,
)
from dlm.config import RunConfig
from dlm.errors import DlmError


def _write(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _smoke_dict() -> dict:
    return load_compare_spec("smoke").to_dict()


def _eval(d: dict, part: str, value: object) -> dict:
    """``d`` with ``evaluation[part]`` replaced (a field) or updated (a section)."""
    ev = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d["evaluation"].items()}
    ev[part] = {**ev[part], **value} if isinstance(value, dict) else value
    return {**d, "evaluation": ev}


def _refused(tmp_path: Path, d: dict, *words: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(DlmError) as e:
        load_compare_spec(_write(tmp_path, d), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("name", ["smoke", "quickstart"])
def test_presets_resolve_every_arm_and_seed(name: str) -> None:
    assert {"smoke", "quickstart"} <= set(available_compare_presets())
    spec = load_compare_spec(name)
    assert [a.name for a in spec.arms] == [a.family for a in spec.arms]
    assert {"ar", "d3pm", "mdlm", "sedd"} == {a.family for a in spec.arms}
    assert len(spec.seeds) == 2
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = arm_run_config(spec, arm, seed, data_dir="/data/x")
            assert isinstance(cfg, RunConfig)
            assert cfg.process.name == arm.family
            assert cfg.train.seed == seed
            assert cfg.train.max_steps == spec.budget.steps and cfg.train.max_tokens == 0
            assert cfg.process.eval_t_samples == spec.evaluation.likelihood.t_samples
            assert cfg.eval.split == spec.evaluation.likelihood.split
            assert cfg.data.dir == "/data/x"
            assert cfg.model.n_layer == spec.shared["model.n_layer"]


def test_shorthands_and_budget_kinds(tmp_path: Path) -> None:
    d = _smoke_dict()
    d["arms"] = [{"family": "gpt2"}, {"family": "d3pm-uniform"}, {"name": "su", "family": "sedd-uniform"}]
    d["budget"] = {"tokens": 4096}
    d["shared"] = {**d["shared"], "train": {"lr": "3e-4", "betas": "0.9,0.99"}}  # strings parsed by field type
    spec = load_compare_spec(_write(tmp_path, d))
    g, du, su = (arm_run_config(spec, a, 0) for a in spec.arms)
    assert (g.process.name, g.model.backbone) == ("ar", "gpt2-hf")
    assert (du.process.name, du.process.transition) == ("d3pm", "uniform")
    assert (su.process.name, su.process.transition) == ("sedd", "uniform")
    assert (g.train.max_tokens, g.train.max_steps) == (4096, 0)
    assert (g.train.lr, g.train.betas) == (3e-4, (0.9, 0.99)) and spec.shared["train.lr"] == 3e-4
    d["budget"] = {"minutes": 1.5}
    spec = load_compare_spec(_write(tmp_path, d))
    cfg = arm_run_config(spec, spec.arms[0], 0)
    assert cfg.train.time_limit_min == 1.5 and cfg.train.max_steps > 0
    assert {"ar", "d3pm", "mdlm", "sedd", "gpt2", "d3pm-uniform", "sedd-uniform"} <= set(known_families())


def test_overrides() -> None:
    spec = load_compare_spec(
        "smoke",
        [
            "--seeds",
            "3,4,5",
            "--budget.steps=7",
            "--arms.mdlm.family",
            "sedd",
            "--arms.mdlm.name",
            "sedd2",
            "--arms.sedd2.samplers",
            "euler",  # the smoke preset's mdlm sweep entries are mdlm samplers
            "--arms.2.overrides.process.T",
            "8",
            "--shared.train.lr",
            "3e-4",
            "--evaluation.samples.steps",
            "2,8",
            "--evaluation.likelihood.t_samples",
            "4",
            "--corpus.seq_len",
            "64",
        ],
    )
    assert spec.seeds == (3, 4, 5)
    assert spec.budget.steps == 7
    assert [a.name for a in spec.arms] == ["ar", "sedd2", "d3pm", "sedd"]
    assert spec.arms[1].family == "sedd" and spec.arms[1].samplers == ("euler",)
    assert spec.evaluation.samples.steps == (2, 8)
    assert spec.corpus.seq_len == 64
    cfg = arm_run_config(spec, spec.arm("d3pm"), 5)
    assert (cfg.process.T, cfg.train.lr, cfg.train.seed, cfg.train.max_steps) == (8, 3e-4, 5, 7)
    assert cfg.process.eval_t_samples == 4


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["--arms.9.family", "ar"], ["arms.9", "no arm"]),
        (["--budget.step", "3"], ["unknown compare spec key 'budget.step'", "did you mean steps"]),
        (["--seeds", "a,b"], ["seeds", "expected"]),
        (["--budget"], ["budget", "only its fields"]),
        (["--shared", "1"], ["shared", "give a key"]),
        (["--arms.ar.overrides.train.seed", "3"], ["train.seed", "set by seeds"]),
        (["--arms.ar.overrides.process.name", "mdlm"], ["process.name", "family"]),
        (["--shared.train.max_steps", "3"], ["shared", "one budget"]),
        (["--arms.ar.overrides.model.n_layr", "3"], ["arms.ar.overrides", "model.n_layr", "did you mean n_layer"]),
        (["--shared.modle.n_layer", "3"], ["shared", "unknown run-config section 'modle'"]),
        (["--shared.train.lr", "fast"], ["shared.train.lr", "expected float"]),
        (["--arms.d3pm.overrides.process.T", "0"], ["arm 'd3pm'", "process.T"]),
        (["--shared.train.lr", "-1"], ["train.lr", "must be > 0"]),
        (["--arms.mdlm.samplers", "ancestral"], ["arms.1.samplers", "ancestral", "first_hitting"]),
        (["--arms.d3pm.steps", "4,64"], ["arms.2.steps", "64", "limit 16"]),
    ],
)
def test_bad_overrides_are_refused(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(DlmError) as e:
        load_compare_spec("smoke", overrides)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_refusals(tmp_path: Path) -> None:
    d = _smoke_dict()
    _refused(tmp_path, {**d, "arms": [{"family": "gpt3"}]}, "arms.0.family", "gpt3", "mdlm", "sedd-uniform", "gpt2")
    _refused(tmp_path, {**d, "arms": []}, "arms", "empty")
    _refused(tmp_path, {**d, "arms": [{"family": "ar"}, {"family": "ar"}]}, "arms.1.name", "duplicate", "'ar'")
    _refused(tmp_path, {**d, "arms": [{"name": "a/b", "family": "ar"}]}, "arms.0.name")
    _refused(tmp_path, {**d, "seeds": []}, "seeds", "empty")
    _refused(tmp_path, {**d, "seeds": [1, 2, 1]}, "seeds", "duplicated")
    _refused(tmp_path, {**d, "budget": {"steps": 0}}, "budget.steps", "> 0")
    _refused(tmp_path, {**d, "budget": {"minutes": -1.0}}, "budget.minutes", "> 0")
    _refused(tmp_path, {**d, "budget": {}}, "budget", "exactly one", "none is set")
    _refused(tmp_path, {**d, "budget": {"steps": 5, "tokens": 9}}, "exactly one", "steps and tokens are set")
    _refused(tmp_path, {**d, "colour": 1}, "unknown compare spec key 'colour'")
    _refused(tmp_path, {**d, "evaluation": {"samples": {"nn": 1}}}, "evaluation.samples.nn")
    _refused(tmp_path, {**d, "arms": [{"family": "ar", "lr": 1}]}, "arms.0.lr")
    _refused(tmp_path, {**d, "corpus": {"source": "shakespeare", "sed_len": 3}}, "corpus.sed_len", "did you mean")
    _refused(tmp_path, {**d, "seeds": "zero"}, "seeds", "expected")
    _refused(tmp_path, {**d, "budget": {"steps": "many"}}, "budget.steps", "expected int")
    _refused(tmp_path, {**d, "arms": {"family": "ar"}}, "arms", "expected a list")
    _refused(tmp_path, {**d, "shared": [1]}, "shared", "expected a mapping")
    _refused(tmp_path, {**d, "corpus": {"mode": "roll"}}, "corpus.mode", "wrap|pad")
    _refused(tmp_path, {**d, "corpus": {"tokenizer": "bpe:x"}}, "corpus.tokenizer")
    _refused(tmp_path, {**d, "corpus": {"data_dir": str(tmp_path / "nope")}}, "corpus.data_dir", "not a directory")
    missing = tmp_path / "no-model"
    _refused(tmp_path, _eval(d, "evaluator", f"hf:{missing}"), "evaluation.evaluator", str(missing))
    _refused(tmp_path, _eval(d, "evaluator", "judge"), "evaluation.evaluator", "judge-ar")
    _refused(tmp_path, _eval(d, "evaluator", "true-language"), "true-language", "formal")
    _refused(tmp_path, _eval(d, "samples", {"steps": [4, 32]}), "evaluation.samples.steps (arm 'd3pm')", "limit 16")
    _refused(tmp_path, _eval(d, "samples", {"steps": []}), "evaluation.samples.steps", ">= 1")
    _refused(tmp_path, _eval(d, "samples", {"n": 0}), "evaluation.samples.n", ">= 1")
    _refused(tmp_path, _eval(d, "likelihood", {"t_samples": 0}), "evaluation.likelihood.t_samples")
    _refused(tmp_path, {**d, "base": "huge-gpu"}, "unknown preset 'huge-gpu'")
    (tmp_path / "model").mkdir()
    ok = load_compare_spec(_write(tmp_path, _eval(d, "evaluator", f"hf:{tmp_path / 'model'}")))
    assert ok.evaluation.evaluator == f"hf:{tmp_path / 'model'}"


def test_file_and_preset_name_errors(tmp_path: Path) -> None:
    with pytest.raises(DlmError, match="unknown compare preset 'nope'"):
        load_compare_spec("nope")
    with pytest.raises(DlmError, match="compare spec file not found"):
        load_compare_spec(tmp_path / "missing.yaml")


def test_spec_hash_stable_across_dump_and_load(tmp_path: Path) -> None:
    for name in ("smoke", "quickstart"):
        spec = load_compare_spec(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_spec(spec))
        again = load_compare_spec(path)
        assert again == spec
        assert spec_hash(again) == spec_hash(spec) == spec_hash(spec_from_dict(spec.to_dict()))
    base = load_compare_spec("smoke")
    changed = [
        load_compare_spec("smoke", ["--seeds", "0,2"]),
        load_compare_spec("smoke", ["--budget.steps", "21"]),
        load_compare_spec("smoke", ["--arms.sedd.overrides.process.sigma_max", "10"]),
        load_compare_spec("smoke", ["--evaluation.samples.n", "3"]),
        load_compare_spec("smoke", ["--corpus.tokenizer", "chars"]),
    ]
    # run-config overrides are kept dotted and typed: the same setting given another way hashes the same
    same = load_compare_spec("smoke", ["--arms.d3pm.overrides.process.T", "16", "--shared.train.batch_size=4"])
    assert same.arm("d3pm").overrides == {"process.T": 16} and spec_hash(same) == spec_hash(base)
    hashes = {spec_hash(s) for s in changed} | {spec_hash(base)}
    assert len(hashes) == len(changed) + 1
    assert len(spec_hash(base)) == 64


def test_defaults_need_arms_and_budget() -> None:
    with pytest.raises(DlmError, match="arms: the arm list is empty"):
        CompareSpec().validate()


def test_every_field_has_help() -> None:
    import dataclasses

    from dlm.compare import spec as spec_module
    from dlm.config import field_help

    for cls in (spec_module.CompareSpec, spec_module.Corpus, spec_module.Arm, spec_module.Budget):
        assert set(field_help(cls)) == {f.name for f in dataclasses.fields(cls)}, cls
    for cls in (spec_module.Evaluation, spec_module.LikelihoodEval, spec_module.SampleEval, spec_module.SpeedEval):
        assert set(field_help(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


def test_block_diffusion_arms_name_their_block_size(tmp_path: Path) -> None:
    d = _eval(_smoke_dict(), "samples", {"steps": [8, 16]})
    d["arms"] = [{"family": "ar"}, {"family": "bd3lm:4"}, {"family": "bd3lm:16", "name": "wide"}]
    spec = load_compare_spec(_write(tmp_path, d))
    assert [a.name for a in spec.arms] == ["ar", "bd3lm-4", "wide"]
    cfgs = [arm_run_config(spec, a, 0) for a in spec.arms[1:]]
    assert [(c.process.name, c.process.block_size) for c in cfgs] == [("bd3lm", 4), ("bd3lm", 16)]
    for bad in ("bd3lm:0", "bd3lm:", "bd3lm:x", "bd3lm:-2"):
        d["arms"] = [{"family": bad, "name": "b"}]
        _refused(tmp_path, d, "unknown family", "bd3lm:L'")


@pytest.mark.parametrize("name", ["formal-2gram-cpu", "thesis-wikitext103", "lm1b", "owt"])
def test_the_other_presets_build_every_run_config(name: str) -> None:
    """The formal and paper-scale presets are specs that validate: every arm x seed has a run config on the one
    budget (they are run on a formal corpus or GPUs, not in the tests)."""
    spec = load_compare_spec(name)
    assert name in available_compare_presets()
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = arm_run_config(spec, arm, seed, data_dir="/data/x")
            assert cfg.train.seed == seed and cfg.train.max_steps == spec.budget.steps
    if name == "thesis-wikitext103":
        assert list(spec.seeds) == [1000, 2000, 3000] and spec.corpus.seq_len == 512
        assert arm_run_config(spec, spec.arm("d3pm"), 1000).process.T == 1000


def test_block_arms_need_a_dividing_block_size_and_a_step_per_block(tmp_path: Path) -> None:
    d = _smoke_dict()  # rows of 32, samples at 4 and 16 steps
    d["arms"] = [{"family": "bd3lm:4"}]  # 8 blocks: 4 steps cannot cover them
    _refused(tmp_path, d, "evaluation.samples.steps (arm 'bd3lm-4')", "4 steps cannot cover the 8 blocks")
    d["arms"] = [{"family": "bd3lm:5"}]
    _refused(tmp_path, d, "arms.0 (bd3lm-5)", "process.block_size (L' = 5) must divide the sequence length (32)")
    d["arms"] = [{"family": "bd3lm:8", "steps": [4, 8]}]  # 4 blocks
    assert load_compare_spec(_write(tmp_path, d)).arms[0].name == "bd3lm-8"


# ----------------------------------------------------------------------------- the sweep and further evaluations


def _mdlm_arm(samplers: object) -> dict:
    return {"family": "mdlm", "samplers": samplers}


def test_sampler_entries_canonical_and_round_trip(tmp_path: Path) -> None:
    """Names stay names; a mapping keeps its options sorted and gets a label (given or name-key=value); a mapping
    with only a name is that name, so the spec (and its hash) is the same as the name list."""
    from dlm.compare.sweep import entry_parts

    d = _smoke_dict()
    entries = ["ddpm", {"name": "remdm", "remask_strategy": "rescale", "remask_eta": 0.1}, {"name": "first_hitting"}]
    spec = load_compare_spec(_write(tmp_path, {**d, "arms": [_mdlm_arm(entries)]}))
    assert spec.arms[0].samplers == (
        "ddpm",
        {"name": "remdm", "label": "remdm-remask_eta=0.1-remask_strategy=rescale", "remask_eta": 0.1,
         "remask_strategy": "rescale"},
        "first_hitting",
    )  # fmt: skip
    assert entry_parts(spec.arms[0].samplers[1])[1:] == ("remdm", {"remask_eta": 0.1, "remask_strategy": "rescale"})
    again = load_compare_spec(_write(tmp_path, yaml.safe_load(dump_spec(spec))))
    assert spec_hash(again) == spec_hash(spec)
    plain = load_compare_spec(_write(tmp_path, {**d, "arms": [_mdlm_arm(["ddpm", "first_hitting"])]}))
    named = load_compare_spec(_write(tmp_path, {**d, "arms": [_mdlm_arm([{"name": "ddpm"}, "first_hitting"])]}))
    assert spec_hash(plain) == spec_hash(named)
    over = load_compare_spec("smoke", ["--arms.mdlm.samplers", "ddpm,confidence"])
    assert over.arm("mdlm").samplers == ("ddpm", "confidence")


def test_sweep_settings_expand_entries_steps_and_temperatures() -> None:
    from dlm.compare.runner import _speed_settings, sampler_settings
    from dlm.compare.sweep import normalize_entries, temperatures

    spec = load_compare_spec("smoke", ["--evaluation.samples.temperatures", "0.8,1.0"])
    assert temperatures(spec.evaluation.samples) == (0.8, 1.0)
    assert temperatures(load_compare_spec("smoke").evaluation.samples) == (1.0,)  # default: [temperature]
    arm = spec.arm("mdlm")
    got = sampler_settings(arm_run_config(spec, arm, 0), arm, spec.evaluation.samples)
    assert [(s.label, s.sampler, s.steps, s.temperature, s.options) for s in got] == [
        (lab, name, steps, t, opts)
        for lab, name, opts in (("ddpm", "ddpm", ()), ("remdm-0.05", "remdm", (("remask_eta", 0.05),)))
        for steps in (4, 16)
        for t in (0.8, 1.0)
    ]
    assert _speed_settings(got) == [("ddpm", 4), ("ddpm", 16)]  # plain entries, once per temperature-free setting
    ar = spec.arm("ar")
    assert [(s.sampler, s.steps) for s in sampler_settings(arm_run_config(spec, ar, 0), ar, spec.evaluation.samples)] \
        == [("ancestral", None)] * 2  # fmt: skip
    ignored = load_compare_spec("smoke", ["--evaluation.samples.temperatures", "1.0"])
    mdlm = replace(ignored.arm("mdlm"), samplers=normalize_entries(["first_hitting", "entropy_bounded", "ddpm"], "x"))
    got = sampler_settings(arm_run_config(ignored, mdlm, 0), mdlm, ignored.evaluation.samples)
    assert [(s.sampler, s.steps) for s in got] == [
        ("first_hitting", 4), ("entropy_bounded", 4), ("ddpm", 4), ("ddpm", 16)
    ]  # samplers whose samples do not depend on steps run once  # fmt: skip


@pytest.mark.parametrize(
    ("samplers", "words"),
    [
        (["nope"], ["arms.0.samplers", "unknown sampler 'nope'", "remdm"]),
        ([{"name": "nope", "top_k": 3}], ["unknown sampler 'nope'"]),
        ([{"name": "ddpm", "remask_eta": 0.1}], ["arms.0.samplers", "remask_eta", "accepted"]),
        ([{"name": "remdm", "steps": 4}], ["steps", "set by the sweep"]),
        ([{"name": "remdm", "temperature": 0.5}], ["temperature", "set by the sweep"]),
        ([{"name": "remdm", "remask_eta": 2.0}], ["arms.0.samplers", "remask_eta"]),
        ([{"name": "remdm", "label": "x"}, {"name": "ddpm", "label": "x"}], ["two entries labelled 'x'"]),
        ([{"name": "remdm", "label": "a b"}], ["arms.0.samplers.0.label"]),
        ([{"top_k": 3}], ["arms.0.samplers.0", "with a 'name'"]),
        ([{"name": "remdm", "remask_eta": [1]}], ["remask_eta", "a number, a string"]),
    ],
)
def test_bad_sampler_entries_refused(tmp_path: Path, samplers: list, words: list[str]) -> None:
    _refused(tmp_path, {**_smoke_dict(), "arms": [_mdlm_arm(samplers)]}, *words)


def test_further_evaluations_refused(tmp_path: Path) -> None:
    d = _smoke_dict()
    folio = {"source": "shakespeare", "source_options": ["edition=folio"]}
    _refused(tmp_path, _eval(d, "samples", {"temperatures": [0.9, -1.0]}), "evaluation.samples.temperatures", ">= 0")
    _refused(tmp_path, _eval(d, "samples", {"temperatures": [0.9, 0.9]}), "temperatures", "repeat")
    _refused(tmp_path, _eval(d, "zero_shot", [{**folio, "data_dir": str(tmp_path)}]), "zero_shot.0", "exactly one")
    _refused(tmp_path, _eval(d, "zero_shot", [{"name": "x"}]), "zero_shot.0", "exactly one")
    _refused(tmp_path, _eval(d, "zero_shot", [folio, folio]), "zero_shot.1.name", "duplicate")
    _refused(tmp_path, _eval(d, "zero_shot", [{**folio, "max_batches": 0}]), "zero_shot.0.max_batches", ">= 1")
    _refused(tmp_path, _eval(d, "zero_shot", [{"data_dir": str(tmp_path / "no")}]), "zero_shot.0.data_dir")
    _refused(tmp_path, _eval(d, "zero_shot", [{**folio, "source_options": ["x"]}]), "zero_shot.0.source_options")
    timed = {**_mdlm_arm(["ddpm_cache"]), "overrides": {"process": {"time_cond": True}}}
    _refused(tmp_path, {**d, "arms": [timed]}, "arms.0.samplers", "ddpm_cache needs a time-independent model")
    cond = {"n": 4, "prompt_len": 4, "cont_len": 4}
    _refused(tmp_path, _eval(d, "conditional", {**cond, "modes": ["gen-l"]}), "evaluation.conditional.modes")
    _refused(tmp_path, _eval(d, "conditional", {**cond, "mauve_seeds": []}), "conditional.mauve_seeds")
    _refused(tmp_path, _eval(d, "conditional", {**cond, "prompt_from": "end"}), "conditional.prompt_from")
    _refused(tmp_path, _eval(d, "conditional", {**cond, "cont_len": 0}), "evaluation.conditional.cont_len", ">= 1")
    hf = tmp_path / "hf"
    hf.mkdir()
    _refused(tmp_path, _eval(_eval(d, "conditional", cond), "evaluator", f"hf:{hf}"), "conditional", "judge-ar")
    _refused(tmp_path, _eval(d, "downstream", {"tasks": ["x"], "k": 0}), "evaluation.downstream.k", ">= 1")
    _refused(tmp_path, _eval(d, "downstream", {"task_dir": str(tmp_path / "no")}), "downstream.task_dir")
    spec = load_compare_spec(_write(tmp_path, _eval(d, "zero_shot", [folio, {"data_dir": str(hf)}])))
    assert [z.name for z in spec.evaluation.zero_shot] == ["shakespeare", "hf"]  # names from source / directory


def test_a_stored_spec_without_the_new_fields_is_the_same_spec(tmp_path: Path) -> None:
    """A spec.yaml written before the sweep and the further evaluations (no temperatures, zero_shot, conditional,
    downstream) reads as today's spec with those at their defaults: an existing comparison is not 'another spec'."""
    from dlm.compare.state import _same_spec

    spec = load_compare_spec("quickstart", ["--evaluation.zero_shot.folio.max_batches", "8"])
    old = spec.to_dict()
    for key in ("zero_shot", "conditional", "downstream"):
        old["evaluation"].pop(key)
    old["evaluation"]["samples"].pop("temperatures")
    spec.evaluation.zero_shot = []
    assert _same_spec(old, spec)
