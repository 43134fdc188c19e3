"""The docs stay true: worked examples run, the CLI reference is the parser's own help, nothing points outside.

    python tests/test_docs.py --write    # regenerate the `--help` blocks of docs/cli.md after a flag change
"""

from __future__ import annotations

import argparse
import doctest
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
HELP_WIDTH = "100"  # argparse wraps help at $COLUMNS; fixed so the blocks do not depend on the terminal

# <!-- help: podplan trace --> then a ```text block holding `podplan trace --help` verbatim
_HELP_BLOCK = re.compile(r"(<!-- help: (podplan(?: [a-z]+)?) -->\n```text\n)(.*?)(```)", re.S)


def _help_texts() -> dict[str, str]:
    """`podplan --help` and `podplan CMD --help` for every subcommand, at a fixed width."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        from planner.cli.main import build_parser

        parser = build_parser()
        texts = {"podplan": parser.format_help()}
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, child in sub.choices.items():
            texts[f"podplan {name}"] = child.format_help()
        return texts
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _rendered(text: str, helps: dict[str, str]) -> str:
    def block(m: re.Match) -> str:
        return m.group(1) + helps.get(m.group(2), f"(no command {m.group(2)!r})\n") + m.group(4)

    return _HELP_BLOCK.sub(block, text)


def test_cli_reference_is_the_parsers_help():
    helps = _help_texts()
    text = CLI_DOC.read_text()
    documented = {m.group(2) for m in _HELP_BLOCK.finditer(text)}
    missing = sorted(set(helps) - documented)
    assert not missing, f"docs/cli.md has no --help block for {missing}: add '<!-- help: NAME -->' + a text block"
    assert text == _rendered(text, helps), "docs/cli.md is stale: run `python tests/test_docs.py --write`"


def test_balancer_worked_example_runs():
    result = doctest.testfile(str(DOCS / "balancer.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5, "docs/balancer.md lost its worked example"
    assert result.failed == 0, f"{result.failed} of docs/balancer.md's examples print something else (see above)"


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run", ROOT / "pyproject.toml"]
    files += sorted(DOCS.rglob("*.md"))
    for pkg in ("planner", "passes", "costmodels", "runtime", "tests", "bench"):
        files += sorted((ROOT / pkg).rglob("*.py")) + sorted((ROOT / pkg).rglob("*.j2"))
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def test_the_repository_stands_alone():
    # shared/ (design notes, reference numbers) and /work live beside the checkout, not in it
    outside = re.compile(r"\.\./shared|/work/|shared/reference|shared/DESIGN|shared/STYLE")
    problems = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _text_files()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not problems, "points outside the repository:\n" + "\n".join(problems)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # a '# comment' in a block is no heading
    heads = re.findall(r"^#+ (.+)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_doc_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#([^)]*))?\)")
    problems = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for target, anchor in link.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            dest = path.parent / target
            if not dest.exists():
                problems.append(f"{path.relative_to(ROOT)} links to missing {target}")
            elif anchor and anchor not in _anchors(dest):
                problems.append(f"{path.relative_to(ROOT)} links to {target}#{anchor}: no such heading")
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move reference material to docs/"


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print("usage: python tests/test_docs.py --write", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    text = CLI_DOC.read_text()
    new = _rendered(text, _help_texts())
    if new != text:
        CLI_DOC.write_text(new)
        print(f"wrote {CLI_DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
