"""benchmarks/gpu.py --smoke and train_vs_nanogpt.py run on CPU and write JSON whose numbers agree with their
definitions; the nanoGPT-style reference model's loss is the cross-entropy of its logits and it is causal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def ref_module():
    sys.path.insert(0, str(BENCH))
    try:
        import nanogpt_ref
    finally:
        sys.path.remove(str(BENCH))
    return nanogpt_ref


def test_gpu_smoke_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run("gpu.py", "--smoke", "--device", "cpu", "--budget-scale", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] == "cpu" and r["torch"] == torch.__version__ and r["device_name"]
    assert r["sections"] == ["train", "decode", "diffusion"]
    assert r["plan"]["budgets"] == {"peak": 10, "train": 60, "decode": 40, "diffusion": 40}  # smoke's x 2
    peak = r["peak"]["flop_s"]
    assert peak > 0
    plan = r["plan"]
    names = [row["name"] for row in r["train"]]
    assert names == ["dlm ar", "nanogpt_ref ar", "dlm mdlm"]
    for row in r["train"]:
        assert row["tok_s"] == pytest.approx(plan["batch"] * plan["seq_len"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["tok_s"] * row["flops_per_token"] / peak)
    paths = [(row["batch"], row["path"]) for row in r["decode"]]
    assert paths == [(n, p) for n in plan["decode_batches"] for p in ("static", "growing")]
    for row in r["decode"]:  # no EOS stop: every row produces length - 1 tokens after [BOS]
        assert row["new_tokens"] == row["batch"] * (row["length"] - 1)
        assert row["nfe"] == row["length"] - 1
        assert row.get("same_ids_as_static") is (True if row["path"] == "growing" else None)
    assert len(r["diffusion"]) == len(plan["diff_batches"]) * len(plan["diff_steps"])
    for row in r["diffusion"]:
        assert 1 <= row["nfe"] <= row["steps"]
        assert row["s_per_call"] == pytest.approx(row["median_s"] / row["nfe"])


TINY_SHAPE = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--train.batch_size=4"]


def _train_vs_nanogpt(data: Path, out: Path, *args: str) -> dict:
    """benchmarks/train_vs_nanogpt.py on ``data`` at TINY_SHAPE (2 timed steps, 1 warm-up); its JSON."""
    proc = _run(
        "train_vs_nanogpt.py", "--data", str(data), "--steps", "2", "--warmup", "1", *args, "--out", str(out),
        *TINY_SHAPE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {**json.loads(out.read_text()), "stdout": proc.stdout}


def test_train_vs_nanogpt_runs_on_tiny_data(tiny_data: Path, tmp_path: Path) -> None:
    r = _train_vs_nanogpt(tiny_data, tmp_path / "tvn.json", "--rounds", "2", "--profile", "1")
    assert r["overrides"] == TINY_SHAPE and r["batch"] == 4
    c = r["profile_costs"]  # the profile's matmul / attention accounting and the ceiling it implies
    assert c["sgemm_peak_flop_s"] > 0
    for arm in ("dlm", "gpt2"):
        a = c[arm]
        assert 0 < a["mm_s"] < a["total_s"] and 0 < a["attn_s"] < a["total_s"]
        assert a["mm_share"] == pytest.approx(a["mm_s"] / a["total_s"])
        tokens = r["batch"] * r["seq_len"]
        assert a["mm_flop_s"] == pytest.approx(6 * r["params"][arm] * tokens / a["mm_s"])
        assert a["mm_of_peak"] == pytest.approx(a["mm_flop_s"] / c["sgemm_peak_flop_s"])
    assert c["ceiling_gpt2"] == pytest.approx(c["gpt2"]["total_s"] / (c["dlm"]["mm_s"] + c["dlm"]["attn_s"]))
    assert "ceiling vs gpt2" in r["stdout"]
    for row in r["rounds"]:
        assert len(row["dlm_s"]) == len(row["ref_s"]) == 2
        assert row["ratio"] == pytest.approx(row["ref_median_s"] / row["dlm_median_s"])
    for key in ("ratio", "cpu_ratio"):
        assert r["summary"][f"{key}_min"] <= r["summary"][f"{key}_median"] <= r["summary"][f"{key}_max"]
    for row in r["rounds"]:
        assert row["cpu_ratio"] == pytest.approx(row["ref_cpu_median_s"] / row["dlm_cpu_median_s"])


def test_reference_loss_is_the_cross_entropy_of_its_logits_and_causal(ref_module) -> None:
    torch.manual_seed(0)
    model = ref_module.RefGPT(ref_module.RefConfig(vocab_size=50, context=16, n_layer=2, n_head=2, d_model=32))
    ids = torch.randint(0, 50, (3, 12))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    direct = -F.log_softmax(logits.double(), -1).gather(-1, ids[:, 1:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 50
    logits2, _ = model(changed[:, :-1])
    torch.testing.assert_close(logits2[:, :8], logits[:, :8])
    assert not torch.allclose(logits2[:, 8:], logits[:, 8:])
    assert model.lm_head.weight is model.wte.weight


def test_reference_step_decreases_the_loss_on_a_fixed_batch(ref_module) -> None:
    torch.manual_seed(0)
    model = ref_module.RefGPT(ref_module.RefConfig(vocab_size=50, context=16, n_layer=1, n_head=2, d_model=32))
    opt = ref_module.ref_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    step = ref_module.RefStep(model, opt, grad_clip=1.0)
    ids = torch.randint(0, 50, (4, 16))
    losses = [float(step(ids)) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5


def test_train_vs_nanogpt_both_references_interleaved(tiny_data: Path, tmp_path: Path) -> None:
    """--ref both: the GPT-2 and the LLaMA-style references in one three-way interleave, each ratio its own."""
    r = _train_vs_nanogpt(tiny_data, tmp_path / "tvn_both.json", "--ref", "both", "--rounds", "1")
    assert r["refs"] == ["gpt2", "llama"]
    assert r["params"]["llama"] == r["params"]["dlm"]
    for row in r["rounds"]:
        assert len(row["dlm_s"]) == len(row["gpt2_s"]) == len(row["llama_s"]) == 2
        for ref in ("gpt2", "llama"):
            assert row[f"ratio_{ref}"] == pytest.approx(row[f"{ref}_median_s"] / row["dlm_median_s"])
        assert row["ratio"] == row["ratio_gpt2"]  # the first reference keeps the old field names


@pytest.mark.slow
def test_device_check_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    """benchmarks/device_check.sh, the one-call GPU check, in its CPU smoke mode: every file it promises, the
    CUDA tests collected (and skipped here), gpu.py's JSON with the scaled budgets."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path), "PY": sys.executable, "SCALE": "2"}
    proc = subprocess.run(
        ["bash", str(BENCH / "device_check.sh"), "smoke", "--smoke"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.txt", "gpu.json", "gpu.log", "pytest_gpu.log"]
    env_txt = (tmp_path / "env.txt").read_text()
    assert f"torch {torch.__version__}" in env_txt and "MISSING" not in env_txt
    log = (tmp_path / "pytest_gpu.log").read_text()
    assert "skipped" in log and "pytest exit 0" in log
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["label"] == "smoke" and r["smoke"] and r["plan"]["budgets"]["train"] == 60
    assert r["sections"] == ["decode", "diffusion", "train"] and all(r[s] for s in r["sections"])
    assert "device_check: gpu.py exit 0" in proc.stdout
