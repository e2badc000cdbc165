"""Local multiple-choice tasks made from a prepared corpus: deterministic questions whose choices lm-eval splits
at the context's tokens, a model that memorised the answers scoring 1 (and 0 when it memorised a distractor)
through ``dlm lm-eval``, reuse of a task directory, and one-line refusals."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from dlm.errors import DlmError
from dlm.eval.localtasks import CLAUSE_END, KINDS, N_CHOICES, write_tasks
from tests.helpers import WORDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"n": 10, "context_tokens": 16, "span_tokens": 5}


def _write_corpus(root: Path) -> Path:
    """train/validation/test files of blank-line separated stanzas: lines of 3-8 words, each ending with a
    punctuation mark."""
    rng = random.Random(5)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 30), ("validation", 3), ("test", 20)):
        stanzas = []
        for _ in range(n):
            lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + rng.choice(".,;!?")
                     for _ in range(rng.randint(3, 6))]  # fmt: skip
            stanzas.append("\n".join(lines).capitalize())
        (root / f"{split}.txt").write_text("\n\n".join(stanzas) + "\n")
    return root


def _prepare(root: Path, tokenizer: str) -> Path:
    from dlm.data.shards import prepare
    from dlm.data.sources import get_source

    corpus = root / "corpus"
    if not corpus.exists():
        _write_corpus(corpus)
    return prepare(get_source(str(corpus)), tokenizer, seq_len=32, out_dir=root / tokenizer.replace(":", ""),
                   log=lambda s: None)  # fmt: skip


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("lt_bpe"), "bpe:300")


@pytest.fixture(scope="module")
def bytes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("lt_bytes"), "bytes")


def _questions(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


def test_tasks_are_deterministic_and_every_choice_is_scored_after_the_contexts_own_ids(bpe_data, tmp_path) -> None:
    from dlm.data.shards import open_split
    from dlm.eval.condgen import split_documents
    from dlm.eval.lmeval import encode_pair

    a, b = tmp_path / "a", tmp_path / "b"
    names = write_tasks(bpe_data, a, **SMALL, kinds=KINDS)
    assert names == ["dlm_cloze", "dlm_lastword", "dlm_lastword_greedy"]
    assert write_tasks(bpe_data, b, **SMALL, kinds=KINDS) == names
    s = open_split(bpe_data, "test")
    tok, docs = s.tokenizer(), split_documents(s)
    for name in names:
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
        yaml, qs = (a / f"{name}.yaml").read_text(), _questions(a, name)
        assert str(a / f"{name}.jsonl") in yaml and len(qs) == SMALL["n"]
        if name == "dlm_lastword_greedy":  # one target, one token after the context
            assert "output_type: loglikelihood" in yaml and {len(q["choices"]) for q in qs} == {1}
            assert all(len(encode_pair(tok, q["context"], q["target"])[1]) == 1 for q in qs)
        else:
            assert "output_type: multiple_choice" in yaml and len({q["label"] for q in qs}) > 1  # the place varies
            assert {len(q["choices"]) for q in qs} == {N_CHOICES}
        for q in qs:
            choices, ctx = q["choices"], q["context"]
            assert q["target"] == choices[q["label"]] and all(c.strip() for c in choices)
            assert len({c.strip().lower() for c in choices}) == len(choices)
            for choice in choices:  # lm-eval's split (target_delimiter "") keeps the context's ids
                c, y = encode_pair(tok, ctx, choice)
                assert c == tok.encode(ctx) and y and tok.decode(y) == choice
            answer, doc = choices[q["label"]].strip(), docs[q["doc"]]
            if name == "dlm_cloze":  # the true span is the text that follows in the document
                assert tok.decode(doc[q["offset"] : q["offset"] + SMALL["span_tokens"]].tolist()).strip() == answer
            else:  # the true word ends a clause in the document
                rest = tok.decode(doc[q["offset"] :].tolist()).lstrip()
                assert rest.startswith(answer) and rest[len(answer)] in CLAUSE_END and answer.isalpha()
            assert tok.decode(doc[: q["offset"]].tolist()).rstrip().endswith(ctx)
    write_tasks(bpe_data, tmp_path / "c", **{**SMALL, "seed": 1})
    assert _questions(tmp_path / "c", "dlm_cloze") != _questions(a, "dlm_cloze")


def test_a_task_directory_is_reused_for_the_same_request_and_refused_for_another(bytes_data, tmp_path) -> None:
    out, lines = tmp_path / "tasks", []
    write_tasks(bytes_data, out, **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    write_tasks(bytes_data, out, **SMALL, log=lines.append)
    assert lines == [f"reused the local tasks in {out}"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(DlmError, match=r"holds local tasks made from other data or settings \(n 10, .*\)"):
        write_tasks(bytes_data, out, **{**SMALL, "n": 9})
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # a moved directory: same questions, the task files point at the new place
    write_tasks(bytes_data, moved, **SMALL)
    assert str(moved / "dlm_cloze.jsonl") in (moved / "dlm_cloze.yaml").read_text()
    assert (moved / "dlm_cloze.jsonl").read_bytes() == (out / "dlm_cloze.jsonl").read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DlmError, match="does not hold dlm local tasks"):
        write_tasks(bytes_data, tmp_path / "other", **SMALL)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "dev"}, r"has no split 'dev'"),
        ({"n": 10_000}, r"the split has only \d+ word starts .* fewer than --n 10000"),
        ({"n": 10_000, "kinds": ["lastword"]}, r"the split has only \d+ clause-final words .* fewer than --n 10000"),
        ({"n": 0}, r"--n must be an integer >= 1"),
        (
            {"kinds": ["lastword_greedy"]},
            r"only 0 of the split's \d+ clause-final words .* one token after its context",
        ),
        ({"kinds": ["cloze", "riddle"]}, r"unknown task kind 'riddle'"),
    ],
)
def test_bad_requests_are_refused_in_one_line(bytes_data, tmp_path, options, message) -> None:
    with pytest.raises(DlmError, match=message) as e:
        write_tasks(bytes_data, tmp_path / "tasks", **{**SMALL, **options})
    assert "\n" not in str(e.value) and not (tmp_path / "tasks").exists()


def _cli(argv: list[str]) -> int:
    import argparse

    from dlm.cli_lmeval import add_commands

    parser = argparse.ArgumentParser(prog="dlm")
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["lm-eval", *argv])
    return args.func(args)


def _small_argv(out: Path, data: Path) -> list[str]:
    return ["--make-tasks", str(out), "--data", str(data), "--n", "6", "--context-tokens", "16", "--span-tokens", "5"]


def test_the_cli_makes_tasks_without_a_run_and_refuses_incomplete_requests(bytes_data, tmp_path, capsys) -> None:
    out = tmp_path / "tasks"
    assert _cli(_small_argv(out, bytes_data)) == 0
    assert f"tasks dlm_cloze, dlm_lastword in {out}" in capsys.readouterr().out
    assert len(_questions(out, "dlm_lastword")) == 6
    with pytest.raises(DlmError, match="--make-tasks needs --data"):
        _cli(["--make-tasks", str(out)])
    with pytest.raises(DlmError, match="leave out --task-dir"):
        _cli([*_small_argv(out, bytes_data), "--task-dir", str(out)])
    with pytest.raises(DlmError, match="give a run directory and --tasks"):
        _cli(["--tasks", "dlm_cloze"])


def test_a_model_that_memorised_the_answers_scores_1_and_one_that_memorised_distractors_0(
    bytes_data, tiny_ar_run, tmp_path, monkeypatch, capsys
) -> None:
    """Through ``dlm lm-eval RUN --make-tasks``: the run's network is replaced by a lookup table of the texts
    context + choice (the true one, then a wrong one), so accuracy must be exactly 1, then 0."""
    pytest.importorskip("lm_eval", reason="the lmeval extra (pip install 'dlm[lmeval]') is not installed")
    import dlm.eval.lmeval_tasks as lmeval
    from dlm.eval.run import run_tokenizer
    from tests.test_lmeval import LookupAR

    run_dir, out = shutil.copytree(tiny_ar_run, tmp_path / "run"), tmp_path / "tasks"
    real_load_run, shift = lmeval.load_run, {"by": 0}

    def memorising_load_run(*args, **kwargs):
        run = real_load_run(*args, **kwargs)
        tok = run_tokenizer(run)
        qs = [q for name in ("dlm_cloze", "dlm_lastword") for q in _questions(out, name)]
        texts = [tok.encode(q["context"] + q["choices"][(q["label"] + shift["by"]) % N_CHOICES]) for q in qs]
        run.model = LookupAR(texts, run.process.vocab_size, run.cfg.model.context)
        return run

    monkeypatch.setattr(lmeval, "load_run", memorising_load_run)
    for by, expected in ((0, 1.0), (1, 0.0)):
        shift["by"] = by
        assert _cli([str(run_dir), *_small_argv(out, bytes_data), "--force"]) == 0
        (path,) = sorted((run_dir / "eval").glob("lmeval-*.json"))
        record = json.loads(path.read_text())
        for name in ("dlm_cloze", "dlm_lastword"):
            task = record["tasks"][name]
            assert task["documents"] == 6 and task["requests"] == 6 * N_CHOICES and task["truncated_requests"] == 0
            assert task["metrics"]["acc"] == expected and task["metrics"]["acc_norm"] == expected
    assert "reused the local tasks" in capsys.readouterr().out


def test_the_greedy_task_is_1_for_a_model_that_memorised_the_words_and_0_for_one_that_did_not(bpe_data, tmp_path):
    """dlm_lastword_greedy through lm-eval (loglikelihood: acc = greedy): a lookup network over the corpus's BPE
    ids that memorised context + word decodes every word greedily (perplexity 1 up to e^-30 terms); with
    nothing memorised (flat logits, argmax id 0, the EOS) none."""
    pytest.importorskip("lm_eval", reason="the lmeval extra (pip install 'dlm[lmeval]') is not installed")
    from types import SimpleNamespace

    from dlm.data.shards import open_split
    from dlm.eval.lmeval import lm_class
    from dlm.eval.lmeval_tasks import run_tasks, task_manager
    from dlm.process import ProcessConfig, get_process
    from tests.test_lmeval import LookupAR

    out, name = tmp_path / "tasks", "dlm_lastword_greedy"
    write_tasks(bpe_data, out, n=6, context_tokens=16, kinds=["lastword_greedy"])
    tok = open_split(bpe_data, "test").tokenizer()
    process = get_process(ProcessConfig(name="ar"), tok.specials)
    for memorised, expected in ((True, 1.0), (False, 0.0)):
        texts = [tok.encode(q["context"] + q["target"]) for q in _questions(out, name)] if memorised else []
        run = SimpleNamespace(model=LookupAR(texts, process.vocab_size, 64), process=process)
        lm = lm_class()(run, tok)
        res = run_tasks(lm, task_manager([name], out).load([name]), limit=None, seed=0)["results"][name]
        assert res["acc,none"] == expected and len(lm.scored) == 6
        if memorised:
            assert res["perplexity,none"] == pytest.approx(1.0, abs=1e-6)
