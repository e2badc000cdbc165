"""Run configuration: presets, YAML files, typed dotted overrides, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dlm.config import (
    RunConfig,
    TrainConfig,
    available_presets,
    config_diff,
    config_hash,
    describe_config,
    field_help,
    load_config,
)
from dlm.errors import DlmError
from dlm.model import build_model, count_params


def test_presets_load_and_validate() -> None:
    assert {"tiny-cpu", "gpt2-small"} <= set(available_presets())
    for name in available_presets():
        assert isinstance(load_config(name), RunConfig)

    tiny = load_config("tiny-cpu")
    # context 0: the data's row length (256 for the demo's data), filled in by the trainer
    assert (tiny.model.n_layer, tiny.model.d_model, tiny.model.n_head, tiny.model.context) == (4, 256, 4, 0)
    assert (tiny.train.batch_size, tiny.train.lr, tiny.train.warmup_steps, tiny.train.schedule) == (
        16,
        2e-3,
        20,
        "cosine",
    )
    assert tiny.model.vocab_size == 0 and tiny.data.dir == ""  # filled in from the data / by the caller


def test_gpt2_small_preset_is_the_124m_model() -> None:
    cfg = load_config("gpt2-small")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.d_model, m.context) == (12, 12, 768, 1024)
    assert (t.batch_size, t.global_batch, t.lr, t.precision, t.compile) == (8, 512, 6e-4, "bf16", True)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(m, vocab_size=50257))
    assert 123e6 < count_params(model) < 125e6  # GPT-2 small: 124M with its 0.8M learned positions


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  n_layer: 3\n  dropout: 0.1\ntrain:\n  lr: 3e-4\n  betas: [0.8, 0.99]\n")
    cfg = load_config(str(path), ["--model.n_layer", "5"])
    assert cfg.model.n_layer == 5  # the override wins
    assert cfg.model.dropout == 0.1
    assert cfg.train.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; the field type makes it a float
    assert cfg.train.betas == (0.8, 0.99)


def test_overrides_are_parsed_with_the_field_type() -> None:
    cfg = load_config(
        "tiny-cpu",
        [
            "--model.n_layer",
            "2",
            "--train.lr=3e-4",
            "--train.compile",  # a bare flag sets a bool
            "--model.tie_weights=false",
            "--train.time_limit_min",
            "1.5",
            "--model.hf_path=none",
            "--train.betas",
            "0.8,0.9",
            "--train.max_tokens=1e6",
            "--data.dir",
            "/x/y",
        ],
    )
    assert cfg.model.n_layer == 2 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.compile is True and cfg.model.tie_weights is False
    assert cfg.train.time_limit_min == 1.5 and cfg.model.hf_path is None
    assert cfg.train.betas == (0.8, 0.9) and cfg.train.max_tokens == 1_000_000
    assert cfg.data.dir == "/x/y"
    cfg = load_config("tiny-cpu", ["--train.time_limit_min", "2", "--train.time_limit_min", "null"])
    assert cfg.train.time_limit_min is None  # later overrides win


def test_to_dict_from_dict_round_trip() -> None:
    cfg = load_config("gpt2-small", ["--process.name=ar", "--train.betas=0.5,0.6"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert RunConfig.from_dict(d) == cfg
    assert set(d) == {"data", "model", "process", "train", "eval"}


def test_every_field_has_help() -> None:
    helps = field_help(TrainConfig)
    assert set(helps) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert "per rank" in helps["batch_size"]
    rows = describe_config()
    assert ("train.batch_size", "int", 16, helps["batch_size"]) in rows
    ours = [key for key, _, _, text in rows if key.split(".")[0] in ("data", "train", "eval") and not text]
    assert ours == []


@dataclasses.dataclass
class CommentedConfig:
    """Fields documented by trailing comments."""

    width: int = 3  # how wide
    depth: float = 1.0


def test_field_help_reads_trailing_comments() -> None:
    assert field_help(CommentedConfig) == {"width": "how wide"}


def test_config_hash_ignores_operational_keys_only() -> None:
    a = load_config("tiny-cpu")
    b = load_config("tiny-cpu", ["--train.log_every=1", "--train.time_limit_min=5", "--train.keep_last=9"])
    c = load_config("tiny-cpu", ["--train.lr=3e-3"])
    assert config_hash(a) == config_hash(b) and config_diff(a, b) == []
    assert config_hash(a) != config_hash(c)
    assert config_diff(a, c) == ["train.lr: 0.002 -> 0.003"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.n_layers", "4"], r"unknown config key 'model.n_layers' \(did you mean n_layer\?\)"),
        (["--modle.n_layer", "4"], r"unknown config section 'modle'.*did you mean model"),
        (["--train.lrr=1"], r"train.lrr.*did you mean lr"),
        (["--model.n_layer", "abc"], r"model.n_layer: expected int, got 'abc'"),
        (["--train.lr", "fast"], r"train.lr: expected float"),
        (["--train.compile=maybe"], r"train.compile: expected bool"),
        (["--train.schedule=cos"], r"train.schedule: expected one of cosine\|linear\|constant"),
        (["--train.precision=fp16"], r"train.precision: expected one of"),
        (["--train.betas=0.9"], r"train.betas: expected 2 values"),
        (["--model.n_layer=0"], r"model.n_layer"),
        (["--model.d_model=-8"], r"model.d_model"),
        (["--model.context=-1"], r"model.context must be >= 0 \(0 = from the data\), got -1"),
        (["--model.vocab_size=-1"], r"model.vocab_size"),
        (["--model.d_model=250"], r"model.d_model \(250\) must be divisible by model.n_head"),
        (["--train.batch_size=0"], r"train.batch_size must be >= 1, got 0"),
        (["--train.grad_accum=0"], r"train.grad_accum"),
        (["--train.val_batches=0"], r"train.val_batches"),
        (["--train.lr=0"], r"train.lr must be > 0"),
        (["--train.max_steps=-3"], r"train.max_steps"),
        (["--train.max_steps=0"], r"train.max_steps: set max_steps or max_tokens"),
        (["--train.ema=1.0"], r"train.ema"),
        (["--train.time_limit_min=0"], r"train.time_limit_min"),
        (["--process.name=nope"], r"process.name: unknown process 'nope'"),
        (["--model.n_layer"], r"model.n_layer: missing value"),
        (["model.n_layer"], r"unexpected argument 'model.n_layer'"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(DlmError, match=message) as info:
        load_config("tiny-cpu", overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DlmError, match=r"unknown preset 'tiny-gpu' \(available: .*tiny-cpu"):
        load_config("tiny-gpu")
    with pytest.raises(DlmError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(DlmError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("model:\n  n_layer: 2\nmodels:\n  x: 1\n")
    with pytest.raises(DlmError, match=r"unknown config section 'models'.*did you mean model"):
        load_config(str(bad))
    bad.write_text("train:\n  batch_size: eight\n")
    with pytest.raises(DlmError, match=r"train.batch_size: expected int, got 'eight'"):
        load_config(str(bad))
    with pytest.raises(DlmError, match=r"unknown config key 'train.seeds'"):
        RunConfig.from_dict({"train": {"seeds": 1}})
