"""The documentation stays attached to the code: every registered detector has its section in
docs/methods.md and its line in the README, every relative link in the READMEs and docs/
resolves (file and, for Markdown targets, heading anchor), every ``docs/methods.md#anchor``
cited in the code exists, and the README stays a quick start (a few screens, the commands CI
runs, a demo table that matches the demo config, every reference page linked) (issue 24)."""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml

from lightning_ood.detectors import DETECTORS, build_detector
from lightning_ood.models import create_model
from lightning_ood.protocol import holds_out

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHODS = ROOT / "docs" / "methods.md"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"

#: "The README fits on a few screens" (issue 24): the reference parts live in docs/.
README_MAX_LINES = 150

#: The Markdown files whose relative links must resolve.
LINKED_DOCS = sorted(
    {ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")}
)

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
#: ``[text](target)`` and ``![alt](target)``; the target may sit in <...> and carry a title.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[^)]*)?\)")
#: Reference definitions ``[id]: target``.
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
#: A citation of this documentation from code or configs, e.g. ``docs/methods.md#fssd`` or
#: ``docs/handoff.md#the-card-lightning-ood-inspect``.
_CITATION = re.compile(r"docs/([A-Za-z0-9_-]+\.md)#([A-Za-z0-9_-]+)")


def _prose_lines(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation except
    ``-`` and ``_`` dropped, spaces turned into ``-`` (duplicates are numbered by
    :func:`anchors`)."""
    text = _INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "").lower()
    kept = "".join(
        c
        for c in text
        if c in " -_" or unicodedata.category(c)[0] in "LN" or unicodedata.category(c) == "Mn"
    )
    return kept.replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The text of every ATX heading of a Markdown file, in order (code blocks skipped)."""
    out = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if m:
            out.append(m.group(2))
    return out


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, GitHub-style (``x``, ``x-1``, ... for repeats)."""
    seen: dict[str, int] = {}
    out = set()
    for text in headings(path):
        slug = github_slug(text)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every relative link of a Markdown file (inline links,
    images and reference definitions; code blocks and code spans ignored)."""
    found = []
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = _INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in _INLINE_LINK.finditer(prose)]
        ref = _REF_DEF.match(prose)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            target = target.strip("<>")
            if target and not _SCHEME.match(target) and not target.startswith("//"):
                found.append((number, target))
    return found


def broken_link(source: Path, target: str) -> str | None:
    """Why ``target`` (a relative link in ``source``) does not resolve, or None."""
    file_part, _, anchor = target.partition("#")
    file_part = unquote(file_part.split("?", 1)[0])
    dest = source if not file_part else (source.parent / file_part).resolve()
    if not dest.exists():
        return f"{file_part} does not exist"
    if anchor and dest.suffix.lower() == ".md" and unquote(anchor) not in anchors(dest):
        return f"{dest.name} has no heading with anchor #{anchor}"
    return None


# -- the helpers themselves -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("fssd", "fssd"),
        ("dice_react", "dice_react"),
        ("Metric conventions", "metric-conventions"),
        ("Layer ensembles: per-set combiners", "layer-ensembles-per-set-combiners"),
        ("Validation-tuned hyperparameters (`tune`)", "validation-tuned-hyperparameters-tune"),
        ("What `make demo` printed", "what-make-demo-printed"),
        ("1. FSSD paper, Table 2 row A", "1-fssd-paper-table-2-row-a"),
        ("Hand-off: one call, one module", "hand-off-one-call-one-module"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_link_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top\n\n## Same name\n\n## Same name\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](a.md) [ok](a.md#same-name-1) [img](a.md#top) [web](https://x.org/y.md)\n"
        "[gone](missing.md) [bad anchor](a.md#nowhere) [self](#here)\n"
        "`[code](nope.md)`\n```\n[fenced](nope.md)\n```\n[ref]: a.md#same-name\n",
        encoding="utf-8",
    )
    links = relative_links(doc)
    assert [t for _, t in links] == [
        "a.md",
        "a.md#same-name-1",
        "a.md#top",
        "missing.md",
        "a.md#nowhere",
        "#here",
        "a.md#same-name",
    ]
    broken = {t for _, t in links if broken_link(doc, t)}
    assert broken == {"missing.md", "a.md#nowhere", "#here"}


# -- the documentation ------------------------------------------------------------------------
def test_every_registered_detector_has_a_section() -> None:
    """A detector registered without its section in docs/methods.md fails here: write the
    section (paper, score as implemented, options, defaults and search space, fitting needs)
    under a heading that is exactly its registry name."""
    documented = set(headings(METHODS))
    missing = sorted(set(DETECTORS) - documented)
    assert not missing, f"docs/methods.md has no section (`## <name>`) for detectors {missing}"


def test_detector_sections_name_their_source_file() -> None:
    """Each detector section links the module that implements it (so the link test below
    also catches a renamed file)."""
    text = METHODS.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^## ", text)
    by_name = {s.split("\n", 1)[0].strip(): s for s in sections[1:]}
    for name, cls in DETECTORS.items():
        module = cls.__module__.replace(".", "/") + ".py"
        assert f"]({'../' + module})" in by_name[name], (
            f"docs/methods.md#{name} does not link {module}"
        )


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = [
        f"{doc.relative_to(ROOT)}:{line}: ({target}) {why}"
        for line, target in relative_links(doc)
        if (why := broken_link(doc, target))
    ]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_code_citations_of_the_docs_resolve() -> None:
    """``docs/<page>.md#<anchor>`` in the package, benchmarks and tests names a page and a
    section that exist (so renaming or moving a section cannot orphan a comment)."""
    known = {p.name: anchors(p) for p in (ROOT / "docs").glob("*.md")}
    bad = []
    for folder in ("lightning_ood", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".yaml", ".yml", ".md", ".sh") or path == Path(__file__):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, line in enumerate(text.splitlines(), start=1):
                bad += [
                    f"{path.relative_to(ROOT)}:{number}: docs/{page}#{anchor}"
                    for page, anchor in _CITATION.findall(line)
                    if anchor not in known.get(page, ())
                ]
    assert not bad, "citations of missing docs/ pages or sections:\n" + "\n".join(bad)


# -- the README is the quick start --------------------------------------------------------------
def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of the Markdown section ``heading`` (up to the next heading of any level)."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if _HEADING.match(lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end])


def _table_rows(text: str) -> list[list[list[str]]]:
    """The body rows (header and rule skipped) of each Markdown table in ``text``, as cells."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append(block[2:])
            block = []
    return tables


def _demo_callback() -> dict[str, Any]:
    """The ``OODEvaluation`` init_args of configs/demo.yaml."""
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    (callback,) = [
        c["init_args"]
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("OODEvaluation")
    ]
    return callback


def test_readme_fits_on_a_few_screens() -> None:
    n = len(_readme().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move reference material into "
        "docs/ (configs.md, data.md, evaluation.md, handoff.md, scaling.md, results.md, "
        "layout.md) and link it"
    )


def test_readme_links_every_reference_page() -> None:
    """Every page under docs/ is reachable from the README in one click."""
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in relative_links(README)}
    orphans = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked)
    assert not orphans, f"README.md links no docs page {orphans}: add it to '## Documentation'"


def test_readme_lists_every_registered_detector() -> None:
    """The README's detector list has one entry per registry name, linked to its section in
    docs/methods.md, and names nothing the registry lacks."""
    body = _section(_readme(), "## Detectors")
    listed = re.findall(r"\[`([a-z_]+)`\]\(docs/methods\.md#([a-z_]+)\)", body)
    assert all(name == anchor for name, anchor in listed), listed
    names = [name for name, _ in listed]
    assert len(names) == len(set(names)), f"listed twice: {names}"
    assert set(names) == set(DETECTORS), (
        f"README '## Detectors' lacks {sorted(set(DETECTORS) - set(names))} and lists "
        f"unregistered {sorted(set(names) - set(DETECTORS))}"
    )


def test_readme_commands_are_what_ci_runs() -> None:
    """`.ci/run` runs exactly the README's test commands, and each is a Makefile target; the
    README's two commands are Makefile targets too."""
    ci = [
        m.group(1)
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if (m := re.fullmatch(r"make (\w+)", line.strip()))
    ]
    assert ci == ["test", "integration"], ci
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"(?m)^([\w-]+):", makefile))
    text = _readme()
    two = re.findall(r"(?m)^make (\w+)", _section(text, "## Two commands on a fresh machine"))
    assert two == ["demo", "test"], f"README's two commands are {two}"
    fenced = re.findall(r"(?m)^make (\w+)", text)
    for target in {*ci, *fenced}:
        assert target in targets, f"README/.ci/run call `make {target}`; the Makefile lacks it"
        assert f"make {target}" in text, f".ci/run calls `make {target}`; README never names it"


def test_readme_demo_table_follows_the_demo_config() -> None:
    """The demo's printed rows are the detectors of configs/demo.yaml in order, each layer
    ensemble that holds out a validation split (``protocol.holds_out``) followed by its
    ``[per-set]`` row; the selection table lists the tuned detectors with as many candidates as
    their search spaces hold and a selected value from each."""
    callback = _demo_callback()
    detectors: dict[str, dict[str, Any]] = callback["detectors"]
    tuned: dict[str, dict[str, list[Any]] | None] = callback["tune"]["detectors"]
    demo = _section(_readme(), "### What `make demo` printed")
    results, selections = _table_rows(demo)

    lenet = create_model("lenet", num_classes=10, in_channels=1)
    expected = []
    for name, spec in detectors.items():
        expected.append(name)
        det = build_detector(name, spec)
        if holds_out(det, len(det.component_names(lenet)), callback["per_set_holdout"]):
            expected.append(f"{name}[per-set]")
    assert [row[0] for row in results] == expected
    assert {row[1] for row in results} == {"mnist"}

    assert [row[0] for row in selections] == list(tuned)
    for name, selected, candidates, _ in selections:
        space = tuned[name] or DETECTORS[detectors[name].get("type", name)].search_space
        assert int(candidates) == math.prod(len(v) for v in space.values()), name
        chosen = dict(kv.split("=", 1) for kv in selected.split(", "))
        assert chosen.keys() == space.keys(), name
        for key, value in chosen.items():
            assert value in {str(v) for v in space[key]}, f"{name}: {key}={value} not searched"

    comment = re.search(r"fits (\d+) detectors, tunes (\d+) of them", _readme())
    assert comment and (int(comment[1]), int(comment[2])) == (len(detectors), len(tuned))
