"""The command line's help: every config field (type, default, docstring) and every family's samplers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dlm.cli import main
from dlm.config import describe_config
from dlm.data.specials import SpecialIds
from dlm.process import ProcessConfig, available_processes, get_process

SUBCOMMANDS = (["prepare"], ["train"], ["eval"], ["sample"], ["infill"], ["experiment"], ["experiment", "formal"])


def help_text(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help_lists_every_config_field_with_type_default_and_docstring(capsys, command):
    out = help_text(capsys, [command])
    lines = out.splitlines()
    rows = describe_config()
    assert len(rows) > 50  # every section, not a handful
    for key, type_label, default, text in rows:
        head = f"--{key} {type_label} (default {json.dumps(default)}"
        assert any(line.strip().startswith(head) for line in lines), head
        assert one_line(text) in one_line(out), key
    assert "--train.max_steps int (default 1000; preset tiny-cpu: 200)" in out  # what `dlm train` really uses


def test_every_config_field_has_a_docstring():
    """A new field without a ``name: text`` line in its class docstring would be an empty help line."""

    def undocumented(rows: list[tuple[str, str, object, str]]) -> list[str]:
        return [key for key, _, _, text in rows if not text.strip()]

    @dataclass
    class Half:
        """A section documenting one of its two fields.

        width: how wide.
        """

        width: int = 3
        depth: int = 2

    assert undocumented(describe_config({"half": Half})) == ["half.depth"]  # the check catches a gap
    assert undocumented(describe_config()) == []


def registered_samplers() -> dict[str, set[tuple[str, str]]]:
    """{process: {(sampler, default sampler)}} over both transitions, from the registry itself."""
    specials = SpecialIds(bos=0, eos=1, pad=1, mask=5, vocab_size=5)
    out: dict[str, set[tuple[str, str]]] = {}
    for name in available_processes():
        for transition in ("absorbing", "uniform"):
            process = get_process(ProcessConfig(name=name, transition=transition), specials)
            out.setdefault(name, set()).update((s, process.default_sampler) for s in process.samplers)
    return out


@pytest.mark.parametrize("command", [["train"], ["demo"], ["sample"], ["infill"], ["eval"]])
def test_help_lists_the_samplers_of_every_registered_process(capsys, command):
    lines = help_text(capsys, command).splitlines()
    registered = registered_samplers()
    assert {"ar", "mdlm", "d3pm", "sedd"} <= set(registered)
    for name, samplers in registered.items():
        row = [line for line in lines if line.startswith(f"  {name} ")]
        assert len(row) == 1, (name, row)
        for sampler, default in samplers:
            assert sampler in re.split(r"[\s,;*]+", row[0]), (name, sampler)
            assert f"{default}*" in row[0], (name, default)
    d3pm = next(line for line in lines if line.startswith("  d3pm "))
    assert "uniform: ddpm*" in d3pm and "absorbing: ddpm*, ddpm_cache" in d3pm  # no ddpm_cache for uniform D3PM


def test_no_stale_help(capsys):
    texts = [help_text(capsys, [])] + [help_text(capsys, argv) for argv in SUBCOMMANDS]
    assert "train a model of any registered family" in texts[0]
    for text in texts:
        assert "later" not in text


def test_parsing_without_help_does_not_import_torch():
    """The help epilogs read the config and process registries (torch) only when help is printed."""
    code = (
        "import sys; from dlm.cli import build_parser; "
        "build_parser().parse_args(['prepare', 'shakespeare']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
