"""The comparison spec: presets load, every arm x seed resolves to a validated run config, overrides, refusals,
and a hash that is stable across dump/load and changes with any field."""

from __future__ import annotations

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
