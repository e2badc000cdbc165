"""A local Hugging Face causal LM as the gen-PPL judge (issue 12), next to ``dlm.eval.genppl.ARRunJudge``.

The judge lives in a local directory (``config.json``, weights, tokenizer files); it is loaded with
``local_files_only=True``, never from the network, in float32. Its tokenizer generally differs from the arms', so
every sample is retokenised (:data:`RETOKENISATION`):

    text_s = arm_tokenizer.decode(x_s)                     dlm Tokenizer, BOS/EOS/PAD/MASK skipped
    y_s    = judge_tokenizer.encode(text_s)                no special tokens added; the text of a special token
                                                           (e.g. "<|endoftext|>") is split as ordinary text
    a_s    = -sum_{i=1..m} ln p(y_i | c, y_1, ..., y_{i-1}),   t_s = m = len(y_s)

c is the judge tokenizer's BOS (its EOS when it has no BOS). Log-probabilities are taken in float64 from the
model's float32 logits and summed in float64. Gen PPL is therefore per *judge* token: t_s counts the judge's
tokens, not the arm's. A sample whose judge tokens do not decode back to its text exactly (an uncased tokenizer
lower-cases, an unknown character becomes [UNK]) is refused, naming the sample and the first differing character:
the judge would otherwise score another text. A row 1 + m longer than the model's context (config
``max_position_embeddings`` / ``n_positions``) is refused: there is no sliding window, which would score tokens
with a truncated history, a different quantity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dlm.errors import DlmError
from dlm.eval.diversity import as_ids

RETOKENISATION = (
    "each sample's ids are decoded to text by the arms' tokenizer (specials skipped); the text is encoded by the "
    "judge's tokenizer without special tokens (special-token text split as ordinary text) and refused unless those "
    "tokens decode back to the same text; the judge scores every one of its tokens after its BOS (else EOS) as "
    "context token, so gen PPL is per judge token; rows longer than the judge's context are refused (no sliding "
    "window)"
)
"""The retokenisation rule, recorded in the evaluator's identity (``info()["retokenisation"]``)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""A judge directory must hold at least one of these (the files that carry a vocabulary)."""

_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_LOGPROB_CHUNK = 256  # positions per float64 log_softmax: bounds memory at 256 x V x 8 bytes


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:200]}"


def _causal_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_config(config: Any, where: Path) -> int:
    """Refuse a config that is not a causal LM; return its context length (positions)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DlmError(f"HF judge {where}: model_type {model_type!r} is not a causal LM (AutoModelForCausalLM)")
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not set(archs) & _causal_class_names():
        raise DlmError(f"HF judge {where}: architectures {archs} hold no causal LM with an LM head")
    if getattr(config, "is_encoder_decoder", False):
        raise DlmError(f"HF judge {where}: an encoder-decoder model is not a causal LM")
    for field in _CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return value
    raise DlmError(f"HF judge {where}: config.json gives no context length ({' / '.join(_CONTEXT_FIELDS)})")


def _load(where: Path, device: str) -> tuple[Any, Any, int]:
    """(tokenizer, model, context length) from the directory, offline; one-line DlmError for each failure."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a bad directory
        raise DlmError(f"HF judge {where}: cannot read config.json: {_one_line(err)}") from err
    context = _check_config(config, where)
    if not any((where / name).is_file() for name in TOKENIZER_FILES):
        raise DlmError(f"HF judge {where}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as err:
        raise DlmError(f"HF judge {where}: cannot load the tokenizer: {_one_line(err)}") from err
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would break the one-line error rule on stderr
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            where, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except Exception as err:
        raise DlmError(f"HF judge {where}: cannot load the model: {_one_line(err)}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(loading.get("missing_keys", []))
    if missing:
        raise DlmError(f"HF judge {where}: the checkpoint lacks {len(missing)} causal-LM weights, e.g. {missing[0]}")
    return tokenizer, model.to(device).eval(), context


@contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _row_nats(logits_LV: torch.Tensor, targets_L: torch.Tensor) -> float:
    """-sum_i ln softmax(logits_i)[targets_i], log_softmax in float64 over chunks of positions."""
    total = 0.0
    for i in range(0, targets_L.numel(), _LOGPROB_CHUNK):
        logp_CV = torch.log_softmax(logits_LV[i : i + _LOGPROB_CHUNK].to(torch.float64), dim=-1)
        chunk_C = targets_L[i : i + _LOGPROB_CHUNK].to(logp_CV.device)
        total -= float(logp_CV.gather(1, chunk_C[:, None]).sum())
    return total


class HFJudge:
    """A local transformers causal LM scoring samples through :data:`RETOKENISATION` (see the module docstring).

    Implements ``dlm.eval.genppl.Judge``: ``token_nll(ids_list) -> (nats float64 [S], judge tokens int64 [S])``.
    Rows of a batch are right-padded under an attention mask; attention is causal (checked at load), so padding
    never changes a sample's score. An empty sample (or one that decodes to "") scores a_s = 0, t_s = 0.
    """

    retokenises = True

    def __init__(
        self, model: Any, tokenizer: Any, arm_tokenizer: Any, *, path: Path, context: int, batch_size: int = 8
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DlmError(f"HF judge batch_size must be an integer >= 1, got {batch_size!r}")
        head = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if head is None:
            raise DlmError(f"HF judge {path}: its tokenizer has neither BOS nor EOS (no context token)")
        n_embed = int(model.get_input_embeddings().num_embeddings)
        if len(tokenizer) > n_embed:
            raise DlmError(f"HF judge {path}: its tokenizer has {len(tokenizer)} tokens, the model embeds {n_embed}")
        self.model = model
        self.tokenizer = tokenizer
        self.arm_tokenizer = arm_tokenizer
        self.path = Path(path)
        self.context = int(context)
        self.batch_size = batch_size
        self.context_id = int(head)
        self._check_causal(n_embed)

    @classmethod
    def from_dir(cls, path: str | Path, arm_tokenizer: Any, *, device: str = "cpu", batch_size: int = 8) -> HFJudge:
        """The judge in a local directory (``config.json``, weights, tokenizer files), loaded offline in float32.

        One-line DlmError when ``path`` is not a directory, has no config.json, holds no causal LM (model type
        outside transformers' causal-LM mapping, architectures without an LM head, missing LM weights, logits
        that depend on later tokens), has no tokenizer files or a tokenizer without BOS and EOS, or fails to load.
        """
        where = Path(path)
        if not where.is_dir():
            raise DlmError(f"HF judge: {where} is not a directory")
        if not (where / "config.json").is_file():
            raise DlmError(f"HF judge {where}: no config.json (not a transformers model directory)")
        tokenizer, model, context = _load(where, device)
        return cls(model, tokenizer, arm_tokenizer, path=where, context=context, batch_size=batch_size)

    def _check_causal(self, n_embed: int) -> None:
        """Refuse a model whose logits at position 0 change with the token at position 1 (not causal, e.g. a BERT
        LM head without ``is_decoder``)."""
        a, b = [i for i in range(3) if i != self.context_id][:2]
        if b >= n_embed:
            return
        ids_BL = torch.tensor([[self.context_id, a], [self.context_id, b]], device=self._device())
        with _evaluating(self.model):
            logits_BLV = self.model(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL)).logits
        if not torch.allclose(logits_BLV[0, 0], logits_BLV[1, 0], rtol=1e-4, atol=1e-5):
            raise DlmError(f"HF judge {self.path}: the model is not causal (its first logits depend on a later token)")

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> dict[str, Any]:
        """The evaluator's identity for quality files (docs/COMPARE.md ``evaluator``)."""
        return {
            "kind": "hf",
            "name": self.path.resolve().name,
            "path": str(self.path.resolve()),
            "tokenizer": {"class": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer)},
            "retokenisation": RETOKENISATION,
            "likelihood": None,
        }

    def retokenise(self, s: int, sample: Any) -> list[int]:
        """Sample ``s`` as judge token ids (no context token), refused unless they decode back to its text and fit
        the context."""
        try:
            text = self.arm_tokenizer.decode(as_ids(sample))
        except DlmError as err:
            raise DlmError(f"sample {s}: {err}") from err
        ids = list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        back = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            i = next((k for k, (p, q) in enumerate(zip(text, back)) if p != q), min(len(text), len(back)))
            theirs = repr(back[i]) if i < len(back) else "the end of the text"
            ours = repr(text[i]) if i < len(text) else "the end of the text"
            raise DlmError(
                f"HF judge {self.path.name} cannot represent sample {s}: at character {i} its tokenizer gives "
                f"{theirs} for {ours}"
            )
        if 1 + len(ids) > self.context:
            raise DlmError(
                f"sample {s} is {len(ids)} judge tokens; the judge scores at most {self.context - 1} (its context "
                f"{self.context} less the context token; no sliding window)"
            )
        return ids

    def token_nll(self, ids_list: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_s float64 [S], t_s int64 [S]) of the samples, ``batch_size`` rows per forward pass (rows grouped by
        length, results in the input order)."""
        rows = [self.retokenise(s, sample) for s, sample in enumerate(ids_list)]
        nats_S = torch.zeros(len(rows), dtype=torch.float64)
        tokens_S = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        order = sorted((s for s in range(len(rows)) if rows[s]), key=lambda s: -len(rows[s]))
        device = self._device()
        with _evaluating(self.model):
            for i in range(0, len(order), self.batch_size):
                chunk = order[i : i + self.batch_size]
                width = 1 + max(len(rows[s]) for s in chunk)
                ids_BL = torch.full((len(chunk), width), self.context_id, dtype=torch.int64)
                mask_BL = torch.zeros((len(chunk), width), dtype=torch.int64)
                for b, s in enumerate(chunk):
                    ids_BL[b, 1 : 1 + len(rows[s])] = torch.tensor(rows[s], dtype=torch.int64)
                    mask_BL[b, : 1 + len(rows[s])] = 1
                logits_BLV = self.model(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device)).logits
                for b, s in enumerate(chunk):
                    m = len(rows[s])
                    nats_S[s] = _row_nats(logits_BLV[b, :m], ids_BL[b, 1 : 1 + m])
        return nats_S, tokens_S
