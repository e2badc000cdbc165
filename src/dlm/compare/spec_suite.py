"""The comparison spec's further evaluations (issue 15), the SEDD study's suite beyond test perplexity: zero-shot
corpora, conditional generation and downstream multiple-choice tasks. Fields of ``dlm.compare.spec.Evaluation``;
each is off by default, so a spec without them is unchanged. Their stages: ``dlm.compare.zeroshot`` and
``dlm.compare.suite``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConditionalEval", "DownstreamEval", "ZeroShot"]


@dataclass
class ZeroShot:
    """A second corpus every run is scored on: zero-shot likelihood (``dlm.eval.run.evaluate_run(data=DIR)``).

    name:           its label in results ("zeroshot:NAME") and the report; default: the source's name.
    source:         a corpus to prepare into DIR/zeroshot/NAME with the comparison corpus's tokenizer (a trained
                    one is reused, not retrained: ``dlm.data.shards.prepare(tokenizer_from=)``), row length
                    and mode; e.g. shakespeare with source_options [edition=folio].
    source_options: options of the source as KEY=VALUE strings.
    data_dir:       a prepared directory instead of a source (it must use the comparison corpus's tokenizer).
    split:          the split scored; "" = evaluation.likelihood.split.
    max_batches:    score at most this many batches of it (>= 1); null = as evaluation.likelihood.max_batches.
    """

    name: str = ""
    source: str = ""
    source_options: tuple[str, ...] = ()
    data_dir: str | None = None
    split: str = ""
    max_batches: int | None = None


@dataclass
class ConditionalEval:
    """Conditional generation (``dlm.eval.condgen.condgen_run``): prompts of P tokens from held-out documents,
    continuations of C tokens by every run, judged by the judge-ar judge (continuation PPL, MAUVE on its hidden
    states, diversity). Off while n = 0.

    n:           prompts (documents with at least P + C tokens, drawn with a fixed seed: the same for every run).
    prompt_len:  P, prompt tokens.
    cont_len:    C, continuation tokens.
    modes:       gen-c (generate C tokens) and/or keep-c (generate the model context, keep the first C).
    seeds:       sampling seeds per run (continuation PPL: mean ± SE over them).
    mauve_seeds: MAUVE's k-means seeds (>= 3 recommended: MAUVE moves by ~0.02 with the seed).
    split:       split the prompts come from; "" = evaluation.likelihood.split.
    prompt_from: where in a document a prompt lies: anywhere (a seeded window) or start (``dlm.eval.condgen``).
    steps:       sampling steps of a step sampler (the family's default sampler); 0 = the family's default.
    batch_size:  prompts continued at once.
    """

    n: int = 0
    prompt_len: int = 50
    cont_len: int = 50
    modes: tuple[str, ...] = ("gen-c", "keep-c")
    seeds: tuple[int, ...] = (0,)
    mauve_seeds: tuple[int, ...] = (0, 1, 2)
    split: str = ""
    prompt_from: str = "anywhere"
    steps: int = 0
    batch_size: int = 16


@dataclass
class DownstreamEval:
    """Multiple-choice tasks through lm-eval (``dlm.eval.lmeval_tasks.evaluate_tasks``; the lmeval extra): accuracy by
    the likelihood of each choice, exact for AR and the diffusion bound with K draws otherwise. Off while tasks
    is empty. Task data must be local (the Hugging Face cache or task_dir); nothing downloads.

    tasks:    lm-eval task names (its registry, or YAML files in task_dir).
    task_dir: a directory of task YAML files (lm-eval's include_path); null = the registry only; auto = tasks
              built from the comparison corpus's likelihood split (``dlm.eval.localtasks``) into DIR/tasks:
              the dlm_KIND names listed, or dlm_cloze and dlm_lastword when none is.
    k:        Monte-Carlo draws per request of a diffusion bound.
    limit:    documents per task; null = all (with auto: the questions built per task, 100 when null).
    """

    tasks: tuple[str, ...] = ()
    task_dir: str | None = None
    k: int = 4
    limit: int | None = None
