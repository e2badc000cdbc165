"""Conditional generation: continue held-out prompts, score the continuations (issue 15; the SEDD study, app. A.4).

Prompts (:func:`select_prompts`): the documents of a split are read back from the prepared rows
(:func:`split_documents`: ``wrap`` data is one stream with an EOS after every document, ``pad`` data holds
``[BOS] doc [EOS]`` per row); of the documents with at least P + C tokens, N are drawn without replacement by
``rng = numpy.random.default_rng(PROMPT_SEED)`` and kept in split order. Where in a document (``prompt_from``):

    anywhere  (default) a window offset o_i ~ Uniform{0, .., len(doc_i) - P - C}, drawn by the same rng after
              the documents, one per document in split order; x = doc[o:o+P], y* = doc[o+P:o+P+C]; head
              b = () (no token in front of the prompt): gen-c rows of P + C tokens
    start     o = 0: x = doc[0:P], y* = doc[P:P+C]; head b = (the document boundary,
              ``dlm.eval.run.boundary_id``), as a document starts in training: gen-c rows of 1 + P + C

One rule per setting, so every prompt of a record has one row length. "anywhere" puts nothing in front even
when it draws o = 0: its windows lie mostly mid-document, where ``wrap`` training rows (slices of the document
stream) start with no boundary either, and a boundary there would claim a document start that is not one;
"start" keeps the boundary because a document start is exactly what the model saw after one. Both draw the
same documents (the documents first, the offsets after), so the two settings differ only in the window; the
same prompts reach every run and family. On a corpus of whole long documents (Shakespeare's test split is whole
plays) "start" makes every prompt a title page; "anywhere" samples the text. ``pad`` data: training rows all
start with BOS, so there "start" is the in-distribution setting. A record without ``prompt_from`` in its
settings was made with "start" (before the setting existed).

Continuations (:func:`generate_continuations`), one per prompt and sampling seed, all exactly C tokens:

    gen-c   draw rows of |b| + P + C positions with (b, x) fixed; y = positions |b|+P .. |b|+P+C-1
    keep-c  draw rows of the model context L with (b, x) fixed; y = the first C positions after the prompt
            (the paper's "generate 1024, keep the first 100")

A prefix family (AR) continues each prompt through its KV cache with ``stop_at_eos`` off, so its rows are as
long as the diffusion rows; an any-position family holds the prompt as fixed ids, ``batch_size`` prompts a call.

Scores of one sampling seed s (:func:`score_seed`), with J the judge (an AR run):

    a_i     = -sum_{j=1..C} ln p_J(y_ij | b, x_i, y_i,<j)          nats of continuation i, prompt as context only
    ppl_s   = exp(sum_i a_i / (N C))                               continuation perplexity (pooled per token)
    f_i     = h_J(b, x_i, y_i)[last position]                      the judge's final hidden state (after its final
                                                                   norm) at the continuation's last token
    MAUVE_sm = area of the divergence frontier of the k-means histograms of {f_i(generated)} and {f_i(human)}
               (``mauve.compute_mauve(p_features, q_features, num_buckets=k, mauve_scaling_factor=c, seed=m)``)

and the diversity of the continuations (``diversity_summary``). The judge reads exactly the context the
generator was given, (b, x_i), then the continuation. The human continuations are scored the same way
(the reference level, no sampling seed). Aggregates: mean and standard error over the sampling seeds (sample
standard deviation / sqrt(seeds); null for one seed); MAUVE first averaged over the sampling seeds per MAUVE seed,
then mean and SE over the MAUVE seeds (``se``), the SE over sampling seeds beside it (``se_seeds``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.data.shards import ShardSplit, open_split, read_meta
from dlm.errors import DlmError
from dlm.eval.diversity import diversity_summary, mean_se
from dlm.eval.genppl import gen_ppl_summary
from dlm.eval.mauve import (
    BUCKETS_RULE,
    MAUVE_MISSING,
    MAUVE_SCALING,
    mauve_buckets,
    mauve_record,
    mauve_score,
)
from dlm.eval.mauve import mauve_module as _mauve_module
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.eval.run import boundary_id, check_tokenizer, resolve_setting, run_tokenizer
from dlm.io import write_json_atomic
from dlm.process.base import token_logprobs
from dlm.rundir import LoadedRun, load_run

__all__ = ["MODES", "PROMPT_FROM", "condgen_run", "generate_continuations"]
__all__ += ["ContinuationJudge", "context_head", "select_prompts", "split_documents"]

#: Version of this protocol, part of every record's settings (bump when old records become incomparable).
CONDGEN_PROTOCOL = 1
MODES = ("gen-c", "keep-c")
PROMPT_FROM = ("anywhere", "start")  # where in a document a prompt window lies (module docstring)
PROMPT_SEED = 0  # the draw of the N documents; fixed, so every run and family sees the same prompts
N_EXAMPLES = 3
FEATURES_RULE = (
    "the judge's final hidden state (after its final norm, the head's input) at the last token of the row "
    "(head, prompt, continuation): the generator's context, then the continuation"
)


# ----------------------------------------------------------------------------- prompts


def split_documents(s: ShardSplit) -> list[np.ndarray]:
    """The documents of a prepared split, in order, as int64 id arrays (no boundary tokens).

    ``wrap``: the rows' real tokens are one stream, every document followed by EOS; documents are the runs
    between EOSs. ``pad``: row r is [BOS?] doc [EOS] truncated to L; the document is what lies between (a
    truncated document ends with the row).
    """
    eos = int(s.specials.eos)
    lengths = np.asarray(s.lengths, dtype=np.int64)
    if s.meta["mode"] == "wrap":
        valid = np.arange(s.seq_len)[None, :] < lengths[:, None]
        stream = np.asarray(s.ids)[valid].astype(np.int64)
        cuts = np.flatnonzero(stream == eos)
        starts = np.concatenate([[0], cuts[:-1] + 1]) if cuts.size else np.zeros(0, dtype=np.int64)
        docs = [stream[a:b] for a, b in zip(starts, cuts, strict=True)]
        if cuts.size == 0 or cuts[-1] + 1 < stream.size:  # a stream that does not end with EOS: its tail
            docs.append(stream[(cuts[-1] + 1 if cuts.size else 0) :])
        return [d for d in docs if d.size]
    head = 0 if s.specials.bos is None else 1
    docs = []
    for r in range(len(s)):
        doc = np.asarray(s.ids[r, head : int(lengths[r])], dtype=np.int64)
        docs.append(doc[:-1] if doc.size and doc[-1] == eos else doc)
    return docs


@dataclass
class PromptSet:
    """N prompts and their human continuations: ``docs[i]`` is the index of the document in the split,
    ``offsets[i]`` where the prompt starts in it."""

    prompts: list[list[int]]
    human: list[list[int]]
    docs: list[int]
    offsets: list[int]
    eligible: int
    total: int
    prompt_from: str = "anywhere"


def select_prompts(
    s: ShardSplit, prompt_len: int, cont_len: int, n: int, seed: int = PROMPT_SEED, *, prompt_from: str = "anywhere"
) -> PromptSet:
    """N documents of at least P + C tokens drawn without replacement (``rng = default_rng(seed)``), in split
    order, then one window offset per document in that order: o_i = ``rng.integers(0, len(doc_i) - P - C + 1)``
    ("anywhere") or 0 ("start"); prompt = doc[o:o+P], human continuation = doc[o+P:o+P+C]. The documents do
    not depend on ``prompt_from``. Fewer such documents than N: one-line DlmError."""
    if prompt_from not in PROMPT_FROM:
        raise DlmError(f"unknown prompt position {prompt_from!r} (choose from {', '.join(PROMPT_FROM)})")
    docs = split_documents(s)
    eligible = [i for i, d in enumerate(docs) if d.size >= prompt_len + cont_len]
    if len(eligible) < n:
        raise DlmError(
            f"no document long enough for {n} prompts: {len(eligible)} of the {len(docs)} documents of split "
            f"{s.name!r} have >= {prompt_len + cont_len} tokens (prompt {prompt_len} + continuation {cont_len}); "
            "lower --n, --prompt-len or --cont-len, or use another split"
        )
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(eligible), size=n, replace=False).tolist())
    chosen = [eligible[i] for i in picked]
    W = prompt_len + cont_len
    if prompt_from == "anywhere":
        offsets = [int(rng.integers(0, docs[i].size - W + 1)) for i in chosen]
    else:
        offsets = [0] * n
    return PromptSet(
        prompts=[docs[i][o : o + prompt_len].tolist() for i, o in zip(chosen, offsets, strict=True)],
        human=[docs[i][o + prompt_len : o + W].tolist() for i, o in zip(chosen, offsets, strict=True)],
        docs=chosen,
        offsets=offsets,
        eligible=len(eligible),
        total=len(docs),
        prompt_from=prompt_from,
    )


def context_head(meta: dict[str, Any], specials: Any, prompt_from: str) -> list[int]:
    """The ids in front of every prompt, b: the document boundary for "start", nothing for "anywhere"."""
    return [boundary_id(meta, specials)] if prompt_from == "start" else []


# ----------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """Continuations of one sampling seed: the rows as drawn (boundary + prompt + generated, ``gen_length`` each),
    the kept continuations (C ids each), per sampler call its NFE and rows, and the summed wall seconds."""

    rows: list[list[int]]
    continuations: list[list[int]]
    nfe_per_call: list[int]
    rows_per_call: list[int]
    wall_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_continuations(
    run: LoadedRun,
    heads: Sequence[Sequence[int]],
    *,
    gen_length: int,
    cont_len: int,
    sampler: str,
    steps: int | None,
    temperature: float,
    seed: int,
    batch_size: int,
) -> Generation:
    """One continuation per head (context head b + prompt, all of one length H >= 1) from one generator seeded
    ``seed``.

    Rows of ``gen_length`` positions with the head fixed; the continuation is positions H .. H+C-1. A prefix
    family (``conditioning == "prefix"``) is called once per head (its prompt is one list for every row), with
    ``stop_at_eos`` off when its sampler takes it; an any-position family ``batch_size`` heads a call, the
    heads given as ``fixed_ids``. Wall time: perf_counter around each ``process.sample`` (device synchronised).
    """
    process, model = run.process, run.model
    dev = next(model.parameters()).device
    H = len(heads[0])
    assert all(len(h) == H for h in heads) and H + cont_len <= gen_length, (H, cont_len, gen_length)
    spec = process.sampler_specs()[sampler]
    opts: dict[str, Any] = {"temperature": temperature}
    if steps is not None:
        opts["steps"] = steps
    prefix = process.conditioning == "prefix"
    if prefix and "stop_at_eos" in spec.accepted():
        opts["stop_at_eos"] = False
    gen = torch.Generator(device=dev).manual_seed(seed)
    step = 1 if prefix else batch_size
    out = Generation([], [], [], [], 0.0)
    for a in range(0, len(heads), step):
        chunk = [list(map(int, h)) for h in heads[a : a + step]]
        kw: dict[str, Any]
        if prefix:
            kw = {"prompt_ids": chunk[0]}
        else:
            fixed_NL = torch.full((len(chunk), gen_length), -1, dtype=torch.int64, device=dev)
            fixed_NL[:, :H] = torch.tensor(chunk, dtype=torch.int64, device=dev)
            kw = {"fixed_ids": fixed_NL}
        _sync(dev)
        t0 = time.perf_counter()
        result = process.sample(model, len(chunk), gen_length, sampler=sampler, generator=gen, **kw, **opts)
        _sync(dev)
        out.wall_s += time.perf_counter() - t0
        ids_NL = result.ids_NL.cpu()
        assert ids_NL.shape[1] == gen_length and bool((result.lengths_N >= H + cont_len).all()), "a row stopped"
        out.rows += ids_NL.tolist()
        out.continuations += ids_NL[:, H : H + cont_len].tolist()
        out.nfe_per_call.append(int(result.nfe))
        out.rows_per_call.append(len(chunk))
    return out


# ----------------------------------------------------------------------------- judge


class ContinuationJudge:
    """An AR run scoring continuations given their prompts, and giving their MAUVE features.

    Row i = (c_i, y_i): c_i the generator's whole context (head b and prompt x_i, H >= 1 tokens), then the
    continuation; one causal forward with ``return_hidden`` gives h [N, H+C, D]; the head on the states at
    positions H-1 .. H+C-2 predicts y_i,1 .. y_i,C (float64 log-softmax):

        a_i = -sum_{j=1..C} ln softmax(W h_i,H+j-2)[y_ij],    t_i = C,    f_i = h_i,H+C-1

    so a_i = nll(c_i, y_i) - nll(c_i) of ``process.nll`` (the context is never scored).
    """

    def __init__(self, run: LoadedRun, batch_size: int = 32) -> None:
        if not getattr(run.process, "exact_likelihood", False):
            raise DlmError(
                f"the judge must be an AR run (an exact likelihood); its family {run.process.name} gives a bound"
            )
        self.model, self.process = run.model, run.process
        self.context = int(run.cfg.model.context)
        self.batch_size = batch_size

    def score(
        self, contexts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(nats float64 [N], scored tokens int64 [N], features float32 [N, D]) of the continuations, each
        given its context (the generator's head + prompt)."""
        H, C = len(contexts[0]), len(conts[0])
        rows = [[*map(int, x), *map(int, c)] for x, c in zip(contexts, conts, strict=True)]
        assert H >= 1 and all(len(r) == H + C for r in rows), "contexts and continuations of one length each"
        if self.context < H + C:
            raise DlmError(f"the judge's context ({self.context}) is shorter than context + continuation ({H + C})")
        dev = next(self.model.parameters()).device
        nats, feats = [], []
        with torch.no_grad():
            for a in range(0, len(rows), self.batch_size):
                ids_BL = torch.tensor(rows[a : a + self.batch_size], dtype=torch.int64, device=dev)
                h_BLD = self.model(ids_BL, attn=self.process.attention, return_hidden=True)
                h_ND = h_BLD[:, H - 1 : H + C - 1].reshape(-1, h_BLD.shape[-1])
                logp_N = token_logprobs(self.model.head_logits(h_ND), ids_BL[:, H:].reshape(-1))
                nats.append(-logp_N.view(ids_BL.shape[0], C).sum(1).cpu())
                feats.append(h_BLD[:, -1].float().cpu().numpy())
        return torch.cat(nats), torch.full((len(rows),), C, dtype=torch.int64), np.concatenate(feats)


def _agg(values: Sequence[float], over: str) -> dict[str, Any]:
    mean, se = mean_se(list(values))
    return {"mean": mean, "se": se, "n_seeds": len(values), "se_over": over}


def _check_args(
    prompt_len: Any, cont_len: Any, n_prompts: Any, mode: str, seeds: Any, mauve_seeds: Any, prompt_from: Any,
    batch_size: Any,
) -> None:  # fmt: skip
    sizes = (("prompt length", prompt_len, 1), ("continuation length", cont_len, 1), ("--n", n_prompts, 2),
             ("batch size", batch_size, 1))  # fmt: skip
    for name, v, lo in sizes:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise DlmError(f"{name} must be an integer >= {lo}, got {v!r}")
    if mode not in MODES:
        raise DlmError(f"unknown conditional generation mode {mode!r} (choose from {', '.join(MODES)})")
    if prompt_from not in PROMPT_FROM:
        raise DlmError(f"unknown prompt position {prompt_from!r} (choose from {', '.join(PROMPT_FROM)})")
    for name, vals in (("seeds", seeds), ("MAUVE seeds", mauve_seeds)):
        ok = isinstance(vals, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in vals)
        if not ok or not vals or len(set(vals)) != len(vals) or min(vals) < 0:
            raise DlmError(f"{name} must be distinct integers >= 0 (at least one), got {vals!r}")


def _check_lengths(run: LoadedRun, judge: LoadedRun, P: int, C: int, mode: str, head: int = 1) -> int:
    """The generated row length (gen-c: |b| + P + C, keep-c: the model context L; ``head`` = |b|, 1 for a
    boundary in front of the prompt, 0 for none), checked before any work."""
    L = int(run.cfg.model.context)
    front = f" (+{head} document boundary)" if head else ""
    if P + head >= L:
        raise DlmError(f"prompt length {P}{front} leaves nothing to generate in the context of {L}")
    if head + P + C > L:
        raise DlmError(
            f"prompt {P} + continuation {C}{' + 1 boundary' if head else ''} = {head + P + C} tokens exceed the "
            f"model context of {L}"
        )
    J = int(judge.cfg.model.context)
    if head + P + C > J:
        raise DlmError(f"the judge's context of {J} is shorter than the row it scores ({head + P + C} tokens)")
    length = head + P + C if mode == "gen-c" else L
    run.process.min_steps(length)  # a family that cuts rows into blocks refuses a length it cannot cut (one line)
    return length


def _judge_identity(judge_dir: Path, judge: LoadedRun) -> dict[str, Any]:
    path = Path(judge_dir).resolve()
    return {
        "name": path.name,
        "run_fingerprint": hashlib.sha256((path / "run.json").read_bytes()).hexdigest()[:16],
        "checkpoint_step": judge.step,
        "ema": judge.ema,
        "tokenizer_fingerprint": judge.data_meta["tokenizer"]["fingerprint"],
    }


def _open(run: LoadedRun, data: str | Path | None, split: str) -> ShardSplit:
    if data is None:
        s = open_split(Path(run.cfg.data.dir), split)
        check_tokenizer(run, s.meta["tokenizer"]["fingerprint"], s.meta["tokenizer"]["name"])
    else:
        s = open_split(Path(data), split)
        check_tokenizer(run, s.meta["tokenizer"]["fingerprint"], s.meta["tokenizer"]["name"], data_dir=data)
    return s


def score_seed(
    judge: ContinuationJudge, contexts: list[list[int]], conts: list[list[int]], human_feats: np.ndarray | None, *,
    mseeds: Sequence[int], num_buckets: int,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """The scores of one sampling seed (module docstring) and the continuations' features, each continuation
    given its context (head + prompt); no MAUVE when ``human_feats`` is None."""
    nats, toks, feats = judge.score(contexts, conts)
    g = gen_ppl_summary(nats, toks)
    scores: dict[str, Any] = {"ppl": g["gen_ppl_pooled"], "nll": g["nll"], "nll_se": g["nll_se"]}
    scores["ppl_seq_mean"] = g["gen_ppl_seq_mean"]
    scores["diversity"] = diversity_summary(conts)
    if human_feats is not None:
        m = [mauve_score(feats, human_feats, seed=s, num_buckets=num_buckets, scaling=MAUVE_SCALING) for s in mseeds]
        mean, se = mean_se([r["mauve"] for r in m])
        scores["mauve"] = {"mean": mean, "se": se, "per_mauve_seed": m}
    return scores, feats


def _load_judge(
    judge_dir: str | Path, run: LoadedRun, run_dir: str | Path, device: str, batch_size: int
) -> tuple[LoadedRun, Any]:
    """The judge run and its ``ContinuationJudge``; refused unless it reads the run's tokenizer."""
    judge_run = load_run(judge_dir, device=device)
    jt, rt = judge_run.data_meta["tokenizer"], run.data_meta["tokenizer"]
    if jt["fingerprint"] != rt["fingerprint"]:
        raise DlmError(
            f"judge {judge_dir} reads tokenizer {jt['name']} with another vocabulary than the {rt['name']} of run "
            f"{run_dir} (fingerprints differ); judge with an AR run trained on the same data"
        )
    return judge_run, ContinuationJudge(judge_run, batch_size=max(batch_size, 32))


def condgen_run(
    run_dir: str | Path,
    judge_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    prompt_len: int = 50,
    cont_len: int = 50,
    n_prompts: int = 32,
    mode: str = "gen-c",
    sampler: str | None = None,
    steps: int | None = None,
    seeds: Sequence[int] = (0,),
    mauve_seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 16,
    device: str = "cpu",
    force: bool = False,
    log: Any = None,
    prompt_from: str = "anywhere",
) -> tuple[dict[str, Any], Path]:
    """Conditional generation of a run judged by an AR run (module docstring); returns (record, path).

    Writes ``RUN/eval/condgen-{mode}-step{N}-{hash}.json`` (``dlm.eval.results``: the same settings reuse the
    file unless ``force``). ``prompt_from``: "anywhere" (a seeded window in each document, no boundary in front)
    or "start" (each document's first tokens after its boundary); module docstring. ``data``: another prepared
    corpus with the run's tokenizer (default: the run's own). Every check of the input is made before any
    sampling: lengths, mode, prompt position, seeds, the judge (an AR run with the run's tokenizer and a context
    that holds the rows), the documents. Without mauve-text everything but MAUVE is computed and
    ``record["mauve"]`` is ``{"missing": MAUVE_MISSING}``.
    """
    seeds, mauve_seeds = list(seeds), list(mauve_seeds)
    _check_args(prompt_len, cont_len, n_prompts, mode, seeds, mauve_seeds, prompt_from, batch_size)
    dev = check_device(device)
    if data is not None:
        read_meta(data)
    run = load_run(run_dir, device=device)
    judge_run, judge = _load_judge(judge_dir, run, run_dir, device, batch_size)
    head = context_head(run.data_meta, run.process.specials, prompt_from)
    length = _check_lengths(run, judge_run, prompt_len, cont_len, mode, len(head))
    name, steps = resolve_setting(run.process, sampler, steps, length)
    s = _open(run, data, split)
    ps = select_prompts(s, prompt_len, cont_len, n_prompts, prompt_from=prompt_from)
    have_mauve = _mauve_module() is not None
    k = mauve_buckets(n_prompts)
    settings = {
        "protocol": CONDGEN_PROTOCOL,
        "mode": mode,
        "prompt_len": prompt_len,
        "cont_len": cont_len,
        "n_prompts": n_prompts,
        "prompt_seed": PROMPT_SEED,
        "prompt_from": prompt_from,
        "context_head": head,
        "split": split,
        "data": {k2: s.meta.get(k2) for k2 in ("inputs_hash", "mode", "seq_len")} | {"zero_shot": data is not None},
        "family": run.process.name,
        "sampler": name,
        "steps": steps,
        "temperature": 1.0,
        "gen_length": length,
        "seeds": seeds,
        "mauve_seeds": mauve_seeds,
        "mauve": {"available": have_mauve, "scaling": MAUVE_SCALING, "num_buckets": k, "features": "last-token"},
        "batch_size": batch_size,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "device": dev.type,
        "process": asdict(run.cfg.process),
        "judge": _judge_identity(Path(judge_dir), judge_run),
    }
    path = result_path(run_dir, "condgen", f"{mode}-step{run.step}", settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    record = _evaluate(run, judge, ps, head, settings, name, steps, length, log)
    write_json_atomic(path, record)
    return record, path


def _evaluate(
    run: LoadedRun, judge: ContinuationJudge, ps: PromptSet, head: list[int], settings: dict[str, Any], sampler: str,
    steps: int | None, length: int, log: Any,
) -> dict[str, Any]:  # fmt: skip
    """Generate and score every sampling seed; the record (module docstring)."""
    tok = run_tokenizer(run)
    C, n = settings["cont_len"], settings["n_prompts"]
    have_mauve, k, mseeds = settings["mauve"]["available"], settings["mauve"]["num_buckets"], settings["mauve_seeds"]
    heads = [[*head, *p] for p in ps.prompts]  # the generator's context; the judge reads the same
    h_nats, h_toks, h_feats = judge.score(heads, ps.human)
    human = gen_ppl_summary(h_nats, h_toks)
    per_seed, gens = [], []
    for seed in settings["seeds"]:
        g = generate_continuations(
            run, heads, gen_length=length, cont_len=C, sampler=sampler, steps=steps, temperature=1.0, seed=seed,
            batch_size=settings["batch_size"],
        )  # fmt: skip
        scores, _ = score_seed(
            judge, heads, g.continuations, h_feats if have_mauve else None, mseeds=mseeds, num_buckets=k
        )
        nfe = sum(g.nfe_per_call) / len(g.nfe_per_call)
        per_seed.append({"seed": seed, **scores, "nfe": nfe, "nfe_per_call": g.nfe_per_call, "wall_s": g.wall_s})
        gens.append(g)
        if log is not None:
            shown = f", MAUVE {scores['mauve']['mean']:.3f}" if "mauve" in scores else ""
            log(f"condgen {settings['mode']} seed {seed}: continuation PPL {scores['ppl']:.2f}{shown}")
    over = "sampling seeds: sample std / sqrt(n_seeds); null for one seed"
    div_keys = ("entropy_mean", "distinct_1", "distinct_2", "repetition_rate")
    record: dict[str, Any] = {
        "kind": "condgen",
        "settings": settings,
        "family": run.process.name,
        "mode": settings["mode"],
        "continuation_ppl": _agg([r["ppl"] for r in per_seed], over),
        "continuation_nll": _agg([r["nll"] for r in per_seed], over),
        "human_ppl": {"mean": human["gen_ppl_pooled"], "se": None, "n_seeds": 1, "nll": human["nll"]}
        | {"nll_se": human["nll_se"], "se_over": "none: the human continuations do not depend on a seed"},
        "diversity": {key: _agg([r["diversity"][key] for r in per_seed], over) for key in div_keys},
        "human_diversity": diversity_summary(ps.human),
        "mauve": mauve_record(per_seed, mseeds, k, FEATURES_RULE) if have_mauve else {"missing": MAUVE_MISSING},
        "nfe": sum(r["nfe"] for r in per_seed) / len(per_seed),
        "nfe_note": "network calls per sampler call, mean over calls and seeds; a prefix family (AR) makes one call "
        "per prompt, an any-position family one per batch of prompts (all its rows in the same calls)",
        "wall_s": sum(r["wall_s"] for r in per_seed),
        "wall_s_per_continuation": sum(r["wall_s"] for r in per_seed) / (n * len(per_seed)),
        "prompts": {"prompt_from": ps.prompt_from, "documents": ps.docs, "offsets": ps.offsets}
        | {"eligible_documents": ps.eligible, "split_documents": ps.total},
        "definitions": _definitions(),
        "per_seed": per_seed,
        "examples": [
            {"prompt": tok.decode(ps.prompts[i]), "human": tok.decode(ps.human[i])}
            | {"generated": tok.decode(gens[0].continuations[i]), "ids": gens[0].rows[i]}
            for i in range(min(N_EXAMPLES, n))
        ],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return record


def _definitions() -> dict[str, str]:
    return {
        "continuation_ppl": "exp(sum_i a_i / (N C)), a_i = -ln p_judge(y_i | head, prompt_i) over the C "
        "continuation tokens only (head: the document boundary for prompt_from start, nothing for anywhere; "
        "the generator's context); mean over sampling seeds",
        "prompt_from": "anywhere: prompt = doc[o:o+P], human = doc[o+P:o+P+C], o uniform in [0, len - P - C] "
        "(seeded, the same for every run); start: o = 0 after the document boundary",
        "human_ppl": "the same for the human continuations (the reference level)",
        "mauve": f"MAUVE(generated, human) on the judge's features: {FEATURES_RULE}; {BUCKETS_RULE}",
        "diversity": "dlm.eval.diversity.diversity_summary of the continuations, per seed; mean over seeds",
        "nfe": "network function evaluations per sampler call",
    }
