"""The zero-shot corpora stage of dlm compare (dlm.compare.zeroshot): prepared with the comparison corpus's trained
tokenizer, only the scored split, reused, and replaced only with --force."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm.compare.spec import spec_from_dict
from dlm.compare.zeroshot import prepare_zero_shot
from dlm.data.shards import prepare, read_meta
from dlm.data.sources import get_source
from dlm.errors import DlmError
from tests.helpers import write_corpus


def _spec(source: Path, **extra: object):
    return spec_from_dict({"evaluation": {"zero_shot": [{"name": "other", "source": str(source), **extra}]}})


def test_prepared_with_the_comparison_tokenizer_reused_and_forced(tmp_path: Path) -> None:
    lines: list[str] = []
    data = prepare(get_source(str(write_corpus(tmp_path / "a", seed=0))), "chars", seq_len=48, mode="pad",
                   out_dir=tmp_path / "data", log=lines.append)  # fmt: skip
    other, changed = write_corpus(tmp_path / "b", seed=3), write_corpus(tmp_path / "c", n_docs=20, seed=5)
    retired: list[Path] = []

    def retire(path: Path, why: str) -> None:
        retired.append(path)
        path.rename(path.with_name(path.name + "-old"))

    dirs = prepare_zero_shot(tmp_path, _spec(other), data, retire, False, lines.append)
    z = dirs["other"]
    meta, own = read_meta(z), read_meta(data)
    assert z == (tmp_path / "zeroshot" / "other").resolve() and list(meta["splits"]) == ["test"]
    assert meta["tokenizer"] == own["tokenizer"] | {"from": str(data.resolve())}
    assert (meta["seq_len"], meta["mode"]) == (48, "pad")
    assert prepare_zero_shot(tmp_path, _spec(other), data, retire, False, lines.append) == dirs
    assert "reusing" in lines[-1] and not retired
    with pytest.raises(DlmError, match="different inputs"):  # another corpus under the same name, no --force
        prepare_zero_shot(tmp_path, _spec(changed), data, retire, False, lines.append)
    again = prepare_zero_shot(tmp_path, _spec(changed), data, retire, True, lines.append)
    assert (
        retired == [tmp_path / "zeroshot" / "other"] and read_meta(again["other"])["inputs_hash"] != meta["inputs_hash"]
    )
    val = prepare_zero_shot(tmp_path / "v", _spec(other, split="validation"), data, retire, False, lines.append)
    assert list(read_meta(val["other"])["splits"]) == ["validation"]
    given = spec_from_dict({"evaluation": {"zero_shot": [{"data_dir": str(z)}]}})
    assert prepare_zero_shot(tmp_path, given, data, retire, False, lines.append) == {"other": z}
