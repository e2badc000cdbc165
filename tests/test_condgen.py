"""Conditional generation (dlm.eval.condgen, issue 15): prompts from document starts and from seeded windows
anywhere in a document, the judge's continuation NLL against its own likelihood (given the generator's context),
prompts kept by every family, gen-c / keep-c lengths, MAUVE identities, the result file's reuse and the refusals."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dlm.data.batch import Batch
from dlm.data.shards import open_split, prepare
from dlm.data.sources import get_source
from dlm.data.tokenizers import build_tokenizer
from dlm.errors import DlmError
from dlm.eval import condgen
from dlm.eval.condgen import ContinuationJudge, condgen_run, generate_continuations, select_prompts, split_documents
from dlm.eval.mauve import frontier_area, mauve_score
from dlm.rundir import load_run
from tests.helpers import tree_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = ["abcdefghij", "xy", "0123456789ABCDEF", "klmnopq"]


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (root / f"{split}.txt").write_text("\n\n".join(DOCS) + "\n")
    return root


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_documents_prompts_and_human_continuations_exact(tmp_path: Path, mode: str) -> None:
    corpus = _corpus(tmp_path / "corpus")
    data = prepare(get_source(str(corpus)), "bytes", seq_len=8, mode=mode, out_dir=tmp_path / "d", log=lambda s: None)
    s = open_split(data, "test")
    tok = build_tokenizer("bytes")
    docs = [d.tolist() for d in split_documents(s)]
    # wrap: the stream runs across rows of 8; pad: one row per document, [BOS] doc [EOS] cut to 8 (7 doc tokens)
    want = [tok.encode(d) if mode == "wrap" else tok.encode(d)[:7] for d in DOCS]
    assert docs == want
    ps = select_prompts(s, 3, 4, 2, prompt_from="start")  # documents >= 7 tokens: 0, 2, 3 (pad: cut to 7)
    assert ps.eligible == 3 and ps.total == 4 and ps.docs == sorted(ps.docs) and len(set(ps.docs)) == 2
    assert ps.offsets == [0, 0] and ps.prompt_from == "start"
    for i, d in zip(ps.docs, range(2), strict=True):
        assert ps.prompts[d] == want[i][:3] and ps.human[d] == want[i][3:7]
    assert select_prompts(s, 3, 4, 2, prompt_from="start").docs == ps.docs  # deterministic
    for where in ("start", "anywhere"):
        with pytest.raises(DlmError, match=r"no document long enough for 4 prompts: 3 of the 4 documents"):
            select_prompts(s, 3, 4, 4, prompt_from=where)
    with pytest.raises(DlmError, match="unknown prompt position 'middle'"):
        select_prompts(s, 3, 4, 2, prompt_from="middle")


LONG_DOCS = ["abcdefghijklmnopqrstuvwxyz", "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "xy", "!#$%&()*+,-./:;<=>?@[]^"]


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_prompts_from_anywhere_are_the_seeded_windows(tmp_path: Path, mode: str) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.txt").write_text("\n\n".join(LONG_DOCS) + "\n")
    data = prepare(get_source(str(corpus)), "bytes", seq_len=32, mode=mode, out_dir=tmp_path / "d", log=lambda s: None)
    s = open_split(data, "test")
    texts = [d.encode() for d in LONG_DOCS]  # bytes: one id per byte, every byte distinct within a document
    P, C, n = 3, 4, 3  # eligible: documents 0, 1, 2, 4 (>= 7 bytes)
    seen: set[tuple[int, ...]] = set()
    for seed in range(6):
        ps = select_prompts(s, P, C, n, seed=seed)
        assert ps.prompt_from == "anywhere" and ps.eligible == 4 and ps.docs == sorted(ps.docs)
        # the documented draw: documents first (as "start" draws them), then one offset per document in order
        rng = np.random.default_rng(seed)
        docs = [[0, 1, 2, 4][i] for i in sorted(rng.choice(4, size=n, replace=False).tolist())]
        offsets = [int(rng.integers(0, len(texts[d]) - P - C + 1)) for d in docs]
        assert (ps.docs, ps.offsets) == (docs, offsets)
        assert select_prompts(s, P, C, n, seed=seed, prompt_from="start").docs == ps.docs
        for d, o, x, y in zip(ps.docs, ps.offsets, ps.prompts, ps.human, strict=True):
            assert 0 <= o <= len(texts[d]) - P - C
            assert bytes(x) == texts[d][o : o + P] and bytes(y) == texts[d][o + P : o + P + C]
        again = select_prompts(s, P, C, n, seed=seed)
        assert (again.prompts, again.human, again.offsets) == (ps.prompts, ps.human, ps.offsets)
        seen.add(tuple(ps.offsets))
    assert len(seen) > 1 and any(o > 0 for offs in seen for o in offs)  # the windows move with the seed


@pytest.mark.parametrize("where", ["start", "anywhere"])
def test_continuation_nll_is_the_judges_nll_of_the_continuation(tiny_ar_run: Path, tiny_data: Path, where) -> None:
    run = load_run(tiny_ar_run)
    judge = ContinuationJudge(run, batch_size=3)
    ps = select_prompts(open_split(tiny_data, "train"), 5, 7, 5, prompt_from=where)
    b = condgen.context_head(run.data_meta, run.process.specials, where)
    assert b == ([257] if where == "start" else [])  # bytes, wrap data: the boundary is EOS
    nats, toks, feats = judge.score([[*b, *p] for p in ps.prompts], ps.human)
    rows = torch.tensor([[*b, *p, *h] for p, h in zip(ps.prompts, ps.human, strict=True)])
    H = len(b) + 5
    full = run.process.nll(run.model, Batch(rows, torch.ones_like(rows, dtype=torch.bool)))
    head = run.process.nll(run.model, Batch(rows[:, :H], torch.ones(5, H, dtype=torch.bool)))
    torch.testing.assert_close(nats, full.nats_B - head.nats_B, rtol=1e-5, atol=1e-5)
    assert toks.tolist() == [7] * 5 and feats.shape == (5, 32)
    with torch.no_grad():
        h_BLD = run.model(rows, attn="causal", return_hidden=True)
    np.testing.assert_allclose(feats, h_BLD[:, -1].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["ar", "mdlm"])
def test_prompts_kept_and_gen_c_keep_c_lengths(tiny_ar_run: Path, tiny_mdlm_run: Path, tiny_data: Path, which) -> None:
    run = load_run(tiny_ar_run if which == "ar" else tiny_mdlm_run)
    ps = select_prompts(open_split(tiny_data, "train"), 6, 5, 5)
    heads = [[257, *p] for p in ps.prompts]  # bytes: EOS 257 is the boundary of wrap data
    for length in (12, 32):  # gen-c: 1 + P + C; keep-c: the context
        g = generate_continuations(
            run, heads, gen_length=length, cont_len=5, sampler=run.process.default_sampler,
            steps=None if which == "ar" else 8, temperature=1.0, seed=3, batch_size=2,
        )  # fmt: skip
        assert [len(r) for r in g.rows] == [length] * 5
        assert [r[:7] for r in g.rows] == heads
        assert g.continuations == [r[7:12] for r in g.rows]
        assert g.rows_per_call == ([1] * 5 if which == "ar" else [2, 2, 1])
        # AR: one forward per generated token; MDLM's ddpm_cache: at most one per step
        assert all((1 <= n <= 8) if which == "mdlm" else n == length - 7 for n in g.nfe_per_call)


def _need_mauve() -> None:
    if condgen._mauve_module() is None:
        pytest.skip("mauve-text is not installed (pip install 'dlm[mauve]')")


def test_mauve_identities() -> None:
    _need_mauve()
    rng = np.random.default_rng(0)
    p = rng.normal(size=(20, 16)).astype(np.float32)
    same = mauve_score(p, p.copy(), seed=0, num_buckets=2, scaling=5.0)
    assert same["mauve"] == pytest.approx(1.0, abs=1e-9)
    e_2D = np.eye(2, 16, dtype=np.float32) * 10  # two far directions: the histograms (1, 0) and (0, 1)
    far = mauve_score(e_2D[0] + p * 0.01, e_2D[1] + p * 0.01, seed=0, num_buckets=2, scaling=5.0)
    assert far["mauve"] < 0.02
    for seed in range(3):  # no tie: the package's own figure
        q = rng.normal(size=(40, 16)).astype(np.float32) + 0.3
        r = mauve_score(rng.normal(size=(40, 16)).astype(np.float32), q, seed=seed, num_buckets=4, scaling=5.0)
        assert r["mauve"] == pytest.approx(r["mauve_package"], abs=1e-12)
    curve = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    assert frontier_area(curve) == 1.0


def test_condgen_record_reuse_and_force(tiny_ar_run: Path, tiny_mdlm_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "mdlm"
    shutil.copytree(tiny_mdlm_run, run)
    kw = {"split": "train", "prompt_len": 6, "cont_len": 6, "n_prompts": 8, "seeds": (0, 1), "batch_size": 8}
    logs: list[str] = []
    record, path = condgen_run(run, tiny_ar_run, mode="keep-c", steps=8, log=logs.append, **kw)
    assert path.parent == run / "eval" and path.name.startswith("condgen-keep-c-step20-")
    assert record["settings"]["prompt_from"] == "anywhere" and record["settings"]["context_head"] == []
    assert json.loads(path.read_text()) == record
    s = record["settings"]
    assert s["gen_length"] == 32 and s["sampler"] == "ddpm" and s["steps"] == 8
    assert record["continuation_ppl"]["n_seeds"] == 2 and record["continuation_ppl"]["se"] is not None
    assert record["human_ppl"]["mean"] > 1 and record["nfe"] == 8
    assert [len(r["nfe_per_call"]) for r in record["per_seed"]] == [1, 1]
    mean = np.mean([r["ppl"] for r in record["per_seed"]])
    assert record["continuation_ppl"]["mean"] == pytest.approx(mean)
    if condgen._mauve_module() is not None:
        m = record["mauve"]
        assert (m["n_mauve_seeds"], m["n_seeds"], m["num_buckets"]) == (3, 2, 2) and 0 <= m["mean"] <= 1
    assert record["examples"][0]["ids"][:6] == [ord(c) for c in record["examples"][0]["prompt"]]  # no boundary
    again, path2 = condgen_run(run, tiny_ar_run, mode="keep-c", steps=8, log=logs.append, **kw)
    assert path2 == path and again == record and logs[-1].startswith("reused")
    forced, _ = condgen_run(run, tiny_ar_run, mode="keep-c", steps=8, force=True, **kw)
    assert forced["continuation_ppl"] == record["continuation_ppl"]  # seeded: the same draws
    _, other = condgen_run(run, tiny_ar_run, mode="gen-c", steps=8, **kw)
    assert other != path and other.name.startswith("condgen-gen-c-step20-")


def test_without_mauve_everything_else_runs(tiny_ar_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    monkeypatch.setitem(sys.modules, "mauve", None)  # `import mauve` raises ImportError
    record, _ = condgen_run(run, tiny_ar_run, split="train", prompt_len=4, cont_len=4, n_prompts=4)
    assert record["mauve"] == {"missing": "pip install 'dlm[mauve]'"}
    assert record["settings"]["mauve"]["available"] is False and record["continuation_ppl"]["mean"] > 1
    assert record["nfe"] == 4  # AR: one call per prompt, one forward per generated token


def test_prompt_from_row_lengths_files_and_the_judges_context(tiny_ar_run: Path, tiny_data: Path, tmp_path) -> None:
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    kw = {"split": "train", "prompt_len": 4, "cont_len": 5, "n_prompts": 4, "mauve_seeds": (0,)}
    records, paths = {}, {}
    for where in ("anywhere", "start"):
        records[where], paths[where] = condgen_run(run, tiny_ar_run, prompt_from=where, **kw)
    assert paths["anywhere"] != paths["start"] and paths["anywhere"].exists() and paths["start"].exists()
    assert len(list((run / "eval").glob("condgen-gen-c-step20-*.json"))) == 2
    s = open_split(tiny_data, "train")
    judge = ContinuationJudge(load_run(tiny_ar_run))
    for where, head in (("anywhere", []), ("start", [257])):
        rec = records[where]
        assert rec["settings"]["prompt_from"] == where and rec["settings"]["context_head"] == head
        assert rec["settings"]["gen_length"] == len(head) + 4 + 5  # gen-c: one row length for every prompt
        ps = select_prompts(s, 4, 5, 4, prompt_from=where)
        assert rec["prompts"]["documents"] == ps.docs and rec["prompts"]["offsets"] == ps.offsets
        for ex, x in zip(rec["examples"], ps.prompts, strict=False):
            assert ex["ids"][: len(head) + 4] == [*head, *x] and len(ex["ids"]) == len(head) + 9
        # the human continuations were scored given exactly the generator's context (head + prompt)
        nats, _, _ = judge.score([[*head, *x] for x in ps.prompts], ps.human)
        assert rec["human_ppl"]["nll"] == pytest.approx(float(nats.sum()) / (4 * 5), rel=1e-6)
    assert records["anywhere"]["prompts"]["documents"] == records["start"]["prompts"]["documents"]
    assert records["start"]["prompts"]["offsets"] == [0] * 4 and any(records["anywhere"]["prompts"]["offsets"])


def _other_tokenizer_judge(tiny_ar_run: Path, root: Path) -> Path:
    judge = root / "judge"
    shutil.copytree(tiny_ar_run, judge)
    info = json.loads((judge / "run.json").read_text())
    info["data_meta"]["tokenizer"]["fingerprint"] = "0" * 64
    (judge / "run.json").write_text(json.dumps(info))
    return judge


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"prompt_len": 32}, "leaves nothing to generate in the context of 32"),
        ({"cont_len": 0}, "continuation length must be an integer >= 1"),
        ({"prompt_len": 20, "cont_len": 12, "prompt_from": "start"}, "= 33 tokens exceed the model context of 32"),
        ({"prompt_len": 20, "cont_len": 13}, r"prompt 20 \+ continuation 13 = 33 tokens exceed the model context"),
        ({"prompt_from": "middle"}, "unknown prompt position 'middle' \\(choose from anywhere, start\\)"),
        ({"n_prompts": 50, "prompt_from": "start"}, "no document long enough for 50 prompts: "),
        ({"n_prompts": 50}, "no document long enough for 50 prompts: "),
        ({"mode": "gen-all"}, "unknown conditional generation mode"),
        ({"judge": "mdlm"}, "the judge must be an AR run"),
        ({"judge": "other"}, "with another vocabulary than the bytes of run"),
    ],
)
def test_refusals_before_any_work(tiny_ar_run, tiny_mdlm_run, tmp_path, change, match) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_mdlm_run, run)
    judge = {"mdlm": tiny_mdlm_run, "other": None}.get(change.pop("judge", None), tiny_ar_run)
    judge = judge or _other_tokenizer_judge(tiny_ar_run, tmp_path)
    kw = {"split": "train", "prompt_len": 6, "cont_len": 6, "n_prompts": 4} | change
    before = tree_state(run)
    with pytest.raises(DlmError, match=match) as e:
        condgen_run(run, judge, **kw)
    assert "\n" not in str(e.value) and tree_state(run) == before


def test_cli_command_parses_and_refuses(tiny_ar_run: Path, tmp_path: Path, capsys) -> None:
    from dlm.cli_condgen import add_commands, int_list

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    argv = ["condgen", str(run), "--judge", str(tiny_ar_run), "--split", "train", "--prompt-len", "4"]
    args = parser.parse_args([*argv, "--cont-len", "4", "--n", "3", "--mauve-seeds", "0"])
    assert args.prompt_from == "anywhere" and args.func(args) == 0
    out = capsys.readouterr().out
    assert "continuation PPL (judge)" in out and "human continuation PPL" in out and "-> " in out
    assert "(from anywhere in a document)" in out
    args = parser.parse_args([*argv, "--cont-len", "4", "--n", "3", "--mauve-seeds", "0", "--prompt-from", "start"])
    assert args.func(args) == 0 and "(from start in a document)" in capsys.readouterr().out
    assert len(list((run / "eval").glob("condgen-gen-c-*.json"))) == 2
    args = parser.parse_args([*argv, "--prompt-from", "end"])
    with pytest.raises(DlmError, match="unknown prompt position 'end'"):
        args.func(args)
    assert int_list("0,1", "--seeds") == [0, 1]
    with pytest.raises(DlmError, match="--seeds must be comma-separated integers"):
        int_list("0,x", "--seeds")


def test_block_family_lengths_checked_before_sampling(tiny_ar_run: Path) -> None:
    from types import SimpleNamespace

    from dlm.data.specials import SpecialIds
    from dlm.process import ProcessConfig, get_process

    judge = load_run(tiny_ar_run)
    specials = SpecialIds.from_dict(judge.data_meta["tokenizer"]["specials"])
    bd3 = get_process(ProcessConfig(name="bd3lm", block_size=4), specials)
    run = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(context=32)), process=bd3)
    assert condgen._check_lengths(run, judge, 6, 5, "keep-c") == 32  # L' = 4 divides the context
    assert condgen._check_lengths(run, judge, 6, 9, "gen-c") == 16
    with pytest.raises(DlmError, match=r"must divide the sequence length \(13\)"):
        condgen._check_lengths(run, judge, 6, 6, "gen-c")  # 1 + P + C = 13 blocks of 4 do not cut
