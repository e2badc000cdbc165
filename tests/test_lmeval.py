"""The lm-eval adapter: the scoring core against direct sums and enumerations, and (with the lmeval extra) a local
multiple-choice task that a memorised model must get 100% right and a model memorising wrong answers 0%."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.eval.lmeval import continuation_logprob, continuation_logprobs
from dlm.process import ProcessConfig, available_processes, get_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 6  # tokenizer vocabulary; MASK is the appended id K
SPECIALS = SpecialIds(bos=0, eos=1, pad=1, mask=K, vocab_size=K)


def _run(name: str, context: int = 12, **options) -> SimpleNamespace:
    """A sharp 1-layer model (``tests.helpers.sharp_tiny_model``'s recipe) time-conditioned when the family is."""
    from dlm.model import ModelConfig, build_model

    process = get_process(ProcessConfig(name=name, **options), SPECIALS)
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=process.vocab_size, context=context, n_layer=1, d_model=32, n_head=2)
    model = build_model(replace(cfg, time_cond=process.time_conditioned))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return SimpleNamespace(model=model.eval().requires_grad_(False), process=process)


def _logp_masked(run: SimpleNamespace, row: list[int], masked: list[int]) -> torch.Tensor:
    """log p_theta(. | row with ``masked`` positions set to MASK), float64 [len(row), K] (the MASK column dropped)."""
    z = torch.tensor([row])
    z[0, masked] = SPECIALS.mask
    logits = run.model(z, attn="bidirectional")[0].to(torch.float64)[:, :K]
    return torch.log_softmax(logits, -1)


def test_ar_logprob_is_the_sum_of_token_logprobs_and_greedy_is_the_argmax_check() -> None:
    run = _run("ar")
    requests = [([0, 2, 3], [4]), ([0, 5], [2, 3, 4]), ([], [3, 3]), ([2] * 20, [5, 1])]  # the last is truncated
    got = continuation_logprobs(run, requests, batch_size=2)
    for (c, y), s in zip(requests, got):
        row = ((c or [SPECIALS.bos]) + y)[-13:]  # rows of context + 1 tokens
        logp = torch.log_softmax(run.model(torch.tensor([row[:-1]]), attn="causal")[0].to(torch.float64), -1)
        pos = range(len(row) - len(y), len(row))
        assert s.exact and s.se is None
        assert s.logprob == pytest.approx(sum(float(logp[i - 1, row[i]]) for i in pos), abs=1e-9)
        assert s.greedy == all(int(logp[i - 1].argmax()) == row[i] for i in pos)
        assert s.truncated == (len(c) + len(y) > 13)
    # a continuation built greedily is greedy
    ctx, cont = [0, 2], []
    for _ in range(3):
        row = ctx + cont
        cont.append(int(run.model(torch.tensor([row]), attn="causal")[0, -1].argmax()))
    assert continuation_logprob(run, ctx, cont, 1, None)[2] is True


def test_ar_logprob_equals_the_family_nll_of_the_row_with_only_the_continuation_scored() -> None:
    from dlm.data.batch import Batch

    run = _run("ar")
    c, y = [0, 3, 2, 5], [4, 4, 1]
    row = torch.tensor([c + y])
    mask = torch.tensor([[False] * len(c) + [True] * len(y)])
    nll = run.process.nll(run.model, Batch(row, mask)).nats_B
    assert continuation_logprob(run, c, y, 1, None)[0] == pytest.approx(-float(nll[0]), abs=1e-9)


def test_mdlm_one_token_continuation_is_the_exact_conditional_under_full_masking() -> None:
    """Linear schedule, m = 1: every draw masks the token with weight n c_1 = s_1 - s_0 = 1, so each draw (and the
    mean) equals log p_theta(y | c, y masked), with SE 0."""
    run = _run("mdlm", schedule="linear")
    c, y = [0, 2, 5, 3], [4]
    logprob, se, greedy, exact = continuation_logprob(run, c, y, 5, torch.Generator().manual_seed(0))
    logp = _logp_masked(run, c + y, [4])[4]
    assert greedy == (int(logp.argmax()) == 4)
    assert not exact and se == pytest.approx(0.0, abs=1e-12)
    assert logprob == pytest.approx(float(logp[4]), abs=1e-9)
    # the greedy check of a one-token continuation: the argmax of p_theta at the masked position
    best = int(logp.argmax())
    for token in range(2, K):
        assert continuation_logprob(run, c, [token], 1, torch.Generator())[2] == (token == best)


def test_mdlm_two_token_bound_mean_is_the_any_order_elbo_below_the_exact_mixture() -> None:
    """m = 2, linear schedule: the bound is (1/2) sum over the 2 orders of log p(first | both masked) + log p(second
    | first shown) (the any-order ELBO, enumerated), at most the log of the mixture over orders, which is the exact
    log-likelihood of the order-random sampler; the mean of many draws matches the ELBO within 4 SE."""
    run = _run("mdlm", schedule="linear")
    c, y = [0, 2, 5], [3, 4]
    row, (a, b) = c + y, (3, 4)
    both = _logp_masked(run, row, [a, b])
    only_a, only_b = _logp_masked(run, row, [a]), _logp_masked(run, row, [b])
    orders = [float(both[a, row[a]] + only_b[b, row[b]]), float(both[b, row[b]] + only_a[a, row[a]])]
    elbo = sum(orders) / 2
    exact = math.log(sum(math.exp(o) for o in orders) / 2)
    assert elbo <= exact
    logprob, se, _, _ = continuation_logprob(run, c, y, 4000, torch.Generator().manual_seed(1))
    assert se is not None and 0 < se < 0.05
    assert abs(logprob - elbo) < 4 * se


@pytest.mark.parametrize("name", [p for p in available_processes() if p != "ar"])
def test_every_diffusion_family_gives_a_finite_bound_with_its_se(name: str) -> None:
    run = _run(name, context=8, **({"block_size": 2} if name == "bd3lm" else {}))
    got = continuation_logprobs(run, [([0, 2, 3, 5], [2, 4]), ([0, 1], [3, 2])], k=3, generator=torch.Generator())
    for s in got:
        assert not s.exact and s.greedy is None and math.isfinite(s.logprob) and s.logprob < 0
        assert s.se is not None and s.se >= 0
    one = continuation_logprobs(run, [([0, 2, 3], [4]), ([0, 5, 2, 3], [1])], k=2, generator=torch.Generator())
    assert all(isinstance(s.greedy, bool) for s in one)  # rows of odd and even length (BD3-LM: blocks of 2)


def test_a_block_family_scores_rows_cut_or_filled_to_whole_blocks() -> None:
    """BD3-LM, L' = 4: a row of 6 drops its 2 oldest context tokens (marked truncated); a row of 3 gets one
    boundary id on the left. Both equal the bound of the aligned row as given."""
    run = _run("bd3lm", context=12, block_size=4, schedule="linear")
    (long, short) = continuation_logprobs(run, [([0, 5, 2, 3, 2], [4]), ([2, 3], [4])], k=1, generator=None)
    assert long.truncated and not short.truncated
    aligned = continuation_logprobs(run, [([2, 3, 2], [4]), ([0, 2, 3], [4])], k=1, generator=None)
    assert [long.logprob, short.logprob] == pytest.approx([s.logprob for s in aligned], abs=1e-9)
    assert not any(s.truncated for s in aligned)


def test_common_draws_do_not_depend_on_the_other_requests_or_their_order() -> None:
    run = _run("mdlm", context=12)
    a, b, c = ([0, 2, 5], [3, 4]), ([0, 3], [2, 2, 5]), ([0, 2, 5], [4])
    first = continuation_logprobs(run, [a, b], k=3, common_seed=7)
    second = continuation_logprobs(run, [b, c, a], k=3, common_seed=7)
    assert second[2] == first[0] and second[0] == first[1]
    # one shared stream (draws="independent") gives a request other draws when the request set changes
    one = continuation_logprobs(run, [a, b], k=3, generator=torch.Generator().manual_seed(7))
    two = continuation_logprobs(run, [b, c, a], k=3, generator=torch.Generator().manual_seed(7))
    assert one[0].logprob != two[2].logprob


def test_common_draws_give_the_choices_of_one_context_the_same_masks(monkeypatch) -> None:
    """Equal-length choices after one context are scored under the same masks and mask counts; a choice of
    another length shares the count's uniform (k / n coupled); another context draws other masks."""
    import dlm.process.estimators as estimators

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = estimators.draw_masks

    def spy(scored_BL, generator, antithetic=True):
        out = real(scored_BL, generator, antithetic)
        seen.append(out)
        return out

    monkeypatch.setattr(estimators, "draw_masks", spy)
    run = _run("mdlm", context=12)
    ctx = [0, 2, 5, 3]
    requests = [(ctx, [3, 4, 2, 2]), (ctx, [5, 1, 4, 3]), ([0, 2, 5, 4], [3, 4, 2, 2])]
    continuation_logprobs(run, requests, k=5, common_seed=3)
    (m0, k0, _), (m1, k1, _), (m2, _, _) = seen
    assert torch.equal(m0, m1) and torch.equal(k0, k1)
    assert not torch.equal(m0, m2)
    seen.clear()
    continuation_logprobs(run, [(ctx, [3, 4, 2, 2, 1, 4, 2]), (ctx, [3, 4, 2])], k=64, common_seed=3)
    (_, k_long, n_long), (_, k_short, n_short) = seen  # k = floor(u n) + 1 with one u per draw for both
    u_lo = torch.maximum((k_long - 1) / n_long, (k_short - 1) / n_short)
    u_hi = torch.minimum(k_long / n_long, k_short / n_short)
    assert bool((u_lo < u_hi).all())  # one u in both intervals, draw by draw


def test_common_draws_keep_the_estimate_unbiased() -> None:
    """The two-token any-order ELBO of the enumeration test, now from common draws: within 4 SE."""
    run = _run("mdlm", schedule="linear")
    c, y = [0, 2, 5], [3, 4]
    row, (a, b) = c + y, (3, 4)
    both = _logp_masked(run, row, [a, b])
    only_a, only_b = _logp_masked(run, row, [a]), _logp_masked(run, row, [b])
    elbo = (float(both[a, row[a]] + only_b[b, row[b]]) + float(both[b, row[b]] + only_a[a, row[a]])) / 2
    (s,) = continuation_logprobs(run, [(c, y)], k=4000, common_seed=11)
    assert s.se is not None and 0 < s.se < 0.05
    assert abs(s.logprob - elbo) < 4 * s.se


def test_bad_requests_are_refused() -> None:
    run = _run("mdlm")
    with pytest.raises(DlmError, match="K"):
        continuation_logprobs(run, [([0], [2])], k=0)
    with pytest.raises(DlmError, match="does not fit"):
        continuation_logprobs(run, [([0], [2] * 12)], k=1)


# ----------------------------------------------------------------------------------------------- with lm_eval

QUIZ = [
    ("cat", ["meow", "woof", "moo"], 0),
    ("dog", ["meow", "woof", "moo"], 1),
    ("cow", ["meow", "woof", "moo"], 2),
    ("owl", ["hoot", "quack"], 0),
    ("duck", ["hoot", "quack"], 1),
]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
{choices}doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _write_task(folder, name: str = "dlm_quiz", choices: bool = True):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUIZ))
    line = 'doc_to_choice: "{{choices}}"\n' if choices else ""
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, choices=line))
    return folder


class LookupAR(torch.nn.Module):
    """A causal "network" that memorised texts: after any prefix of one of them it puts (almost) all mass on that
    text's next token; elsewhere its logits are flat."""

    def __init__(self, texts: list[list[int]], vocab_size: int, context: int) -> None:
        super().__init__()
        self.next = {tuple(t[: i + 1]): t[i + 1] for t in texts for i in range(len(t) - 1)}
        self.vocab_size, self.context = vocab_size, context
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, so the model has a device

    def forward(self, ids_BL: torch.Tensor, attn: object = "causal", **_: object) -> torch.Tensor:
        assert attn == "causal"
        logits = torch.zeros(*ids_BL.shape, self.vocab_size)
        for b, row in enumerate(ids_BL.tolist()):
            for i in range(len(row)):
                if (nxt := self.next.get(tuple(row[: i + 1]))) is not None:
                    logits[b, i, nxt] = 30.0
        return logits


@pytest.fixture(scope="module")
def lm_eval_ready():
    return pytest.importorskip("lm_eval", reason="the lmeval extra (pip install 'dlm[lmeval]') is not installed")


def _memorised_accuracy(run_dir, folder, shift: int) -> dict:
    """Accuracy of a lookup model that memorised 'Q: ...\\nA: <choice answer + shift>' on the local quiz."""
    from dlm.eval.lmeval import lm_class
    from dlm.eval.lmeval_tasks import run_tasks, task_manager
    from dlm.eval.run import run_tokenizer
    from dlm.rundir import load_run

    run = load_run(run_dir)
    tok = run_tokenizer(run)
    texts = [tok.encode(f"Q: {q}\nA: {c[(a + shift) % len(c)]}") for q, c, a in QUIZ]
    run.model = LookupAR(texts, run.process.vocab_size, run.cfg.model.context)
    loaded = task_manager(["dlm_quiz"], folder).load(["dlm_quiz"])
    lm = lm_class()(run, tok)
    out = run_tasks(lm, loaded, limit=None, seed=0)
    assert len(lm.scored) == sum(len(c) for _, c, _ in QUIZ)  # one request per choice
    return out["results"]["dlm_quiz"]


def test_a_model_that_memorised_the_answers_scores_100_and_one_that_memorised_wrong_ones_0(
    lm_eval_ready, tiny_ar_run, tmp_path
) -> None:
    folder = _write_task(tmp_path / "tasks")
    right = _memorised_accuracy(tiny_ar_run, folder, shift=0)
    assert right["acc,none"] == 1.0 and right["acc_norm,none"] == 1.0
    wrong = _memorised_accuracy(tiny_ar_run, folder, shift=1)
    assert wrong["acc,none"] == 0.0 and wrong["acc_norm,none"] == 0.0


def _cli(argv: list[str]) -> int:
    """``dlm ARGV`` with only the lm-eval command registered (``dlm.cli.main``'s error handling: DlmError raises)."""
    import argparse

    from dlm.cli_lmeval import add_commands

    parser = argparse.ArgumentParser(prog="dlm")
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["lm-eval", *argv])
    return args.func(args)


def test_evaluate_tasks_writes_one_result_per_setting_and_reuses_it(lm_eval_ready, tiny_mdlm_run, tmp_path, capsys):
    import json
    import shutil

    run = shutil.copytree(tiny_mdlm_run, tmp_path / "run")
    folder = _write_task(tmp_path / "tasks")
    argv = [str(run), "--tasks", "dlm_quiz", "--task-dir", str(folder), "--k", "2", "--limit", "3"]
    assert _cli(argv) == 0
    files = sorted((run / "eval").glob("lmeval-*.json"))
    assert len(files) == 1 and "acc" in capsys.readouterr().out
    record = json.loads(files[0].read_text())
    task = record["tasks"]["dlm_quiz"]
    assert not record["exact"] and record["k"] == 2 and record["lm_eval_version"] == lm_eval_ready.__version__
    assert task["documents"] == 3 and task["requests"] == record["requests"] == 3 + 3 + 3
    assert 0.0 <= task["metrics"]["acc"] <= 1.0 and task["metrics"]["acc_stderr"] is not None
    assert task["mean_request_se"] is not None and task["mean_request_se"] > 0
    assert record["settings"]["draws"] == "common" and "(common)" in record["likelihood"]
    before = files[0].stat().st_mtime_ns
    assert _cli(argv) == 0 and "reused" in capsys.readouterr().out
    assert files[0].stat().st_mtime_ns == before
    assert _cli([*argv[:-1], "2"]) == 0 and len(list((run / "eval").glob("lmeval-*.json"))) == 2
    assert _cli([*argv, "--draws", "independent"]) == 0 and len(list((run / "eval").glob("lmeval-*.json"))) == 3


def test_bad_input_is_refused_in_one_line(lm_eval_ready, tiny_ar_run, tmp_path, monkeypatch) -> None:
    import dlm.eval.lmeval_tasks as lmeval

    folder = _write_task(tmp_path / "tasks")
    _write_task(tmp_path / "bad", name="no_choices", choices=False)
    base = [str(tiny_ar_run), "--task-dir"]
    with pytest.raises(DlmError, match="K .* must be an integer >= 1"):
        _cli([*base, str(folder), "--tasks", "dlm_quiz", "--k", "0"])
    with pytest.raises(DlmError, match="draws must be one of common, independent, got 'paired'"):
        lmeval.evaluate_tasks(tiny_ar_run, "dlm_quiz", draws="paired")
    with pytest.raises(DlmError, match="gives no choices"):
        _cli([*base, str(tmp_path / "bad"), "--tasks", "no_choices"])
    # lm-eval's whole registry takes seconds to index: the local directory stands in for it here
    local = lm_eval_ready.tasks.TaskManager
    monkeypatch.setattr(lmeval, "registry_manager", lambda d: local(include_path=str(d), include_defaults=False))
    with pytest.raises(DlmError, match=r"unknown lm-eval task 'no_such_task': .*lm-eval ls tasks"):
        _cli([*base, str(folder), "--tasks", "dlm_quiz,no_such_task"])
    assert not (tiny_ar_run / "eval").exists() or not list((tiny_ar_run / "eval").glob("lmeval-*"))


def test_a_missing_extra_names_it(monkeypatch) -> None:
    import builtins

    import dlm.eval.lmeval as lmeval

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(DlmError, match=r"pip install 'dlm\[lmeval\]'"):
        lmeval.import_lm_eval()


class CharTok:
    """A tokenizer over "abcd" (ids 2..5 of ``SPECIALS``), enough for the adapter's encode/decode."""

    def encode(self, text: str) -> list[int]:
        return [2 + "abcd".index(ch) for ch in text]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return "".join("abcd"[i - 2] for i in ids if i >= 2)


class BigramAR(torch.nn.Module):
    """logits at position l depend on token l alone (a random table), so any window's context gives the same."""

    def __init__(self, context: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(3 * torch.randn(K, K, generator=torch.Generator().manual_seed(0)))
        self.context = context

    def forward(self, ids_BL: torch.Tensor, attn: object = "causal", **_: object) -> torch.Tensor:
        return self.table[ids_BL]


def _request(*args):
    return SimpleNamespace(args=args, task_name="t")


def test_rolling_loglikelihood_scores_every_token_once_across_windows(lm_eval_ready) -> None:
    from dlm.eval.lmeval import lm_class

    run = SimpleNamespace(model=BigramAR(context=8), process=get_process(ProcessConfig(name="ar"), SPECIALS))
    text = "abcdabdcaabbccddacbd" * 2  # 40 tokens: 5 windows of rows of 9
    ids = [SPECIALS.bos, *CharTok().encode(text)]
    with torch.no_grad():
        logp = torch.log_softmax(run.model.table.double(), -1)
    expected = sum(float(logp[a, b]) for a, b in itertools.pairwise(ids))
    lm = lm_class()(run, CharTok())
    short, long = lm.loglikelihood_rolling([_request(text[:5]), _request(text)])
    assert long == pytest.approx(expected, abs=1e-9) and len(lm.scored) == 1 + 5
    assert short == pytest.approx(continuation_logprob(run, [], CharTok().encode(text[:5]), 1, None)[0], abs=1e-12)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm_eval_ready) -> None:
    from dlm.eval.lmeval import lm_class

    run = _run("ar", context=16)
    prompt = "abca"
    ids = CharTok().encode(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(run.model(torch.tensor([ids]), attn="causal")[0, -1].argmax()))
            if ids[-1] == SPECIALS.eos:
                break
    greedy = CharTok().decode(ids[4:])
    stop = greedy[2] if len(greedy) > 2 else "zz"
    lm = lm_class()(run, CharTok())
    out = lm.generate_until([_request(prompt, {"until": [stop], "max_gen_toks": 6})])
    assert out == [greedy.split(stop)[0]]
    mdlm = lm_class()(_run("mdlm", context=16), CharTok())
    (text,) = mdlm.generate_until([_request(prompt, {"max_gen_toks": 5})])
    assert set(text) <= set("abcd") and len(text) <= 5
