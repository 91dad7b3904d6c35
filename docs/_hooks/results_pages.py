"""mkdocs hook: the generated reports of the project (analysis/results/*.md, papers/reproduction.md) as pages
of the site under results/, with the figures they show, so the site never holds a retyped copy of a number.

Each page is the file as its script wrote it; links to figures (``../figures/x.png`` from analysis/results,
``../analysis/figures/x.png`` from papers/) are rewritten to ``figures/x.png`` and those PNGs are added to
the site. A report that does not exist is simply not generated (the nav then fails the strict build if it
lists it, which is the point).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "analysis" / "figures"
FIGURE_LINK = re.compile(r"\]\((?:\.\./)+(?:analysis/)?figures/([\w.-]+\.png)\)")
SKIPPED = {"theory_tables.md", "guidance_eval.md"}  # the theory note, and the same text as reproduction.md


def report_sources() -> dict[str, Path]:
    """Site path -> source file of every generated report that exists now."""
    sources = {"results/reproduction.md": ROOT / "papers" / "reproduction.md"}
    for path in sorted((ROOT / "analysis" / "results").glob("*.md")):
        if path.name not in SKIPPED:
            sources[f"results/{path.name}"] = path
    return {uri: path for uri, path in sources.items() if path.is_file()}


OVERVIEW = "results/index.md"
PLACEHOLDER = "<!-- reports -->"
COMMAND = re.compile(r"`((?:python|hopfield-aa) [^`\n]+)`")  # the first command the report names


def overview_table() -> str:
    """A table of every generated report: its title, the command that regenerates it, its page."""
    rows = ["| report | regenerate with | source |", "|---|---|---|"]
    for uri, path in report_sources().items():
        text = path.read_text(encoding="utf-8")
        title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
        found = COMMAND.search(text)
        script = ROOT / "analysis" / f"{path.stem}.py"
        command = found.group(1) if found else f"python analysis/{script.name}" if script.is_file() else None
        name = uri.removeprefix("results/")
        rows.append(
            f"| [{title}]({name}) | {f'`{command}`' if command else '–'} | "
            f"`{path.relative_to(ROOT).as_posix()}` |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri == OVERVIEW:
        return markdown.replace(PLACEHOLDER, overview_table())
    return markdown


def on_files(files: Files, config: Any) -> Files:
    figures: set[str] = set()
    for uri, path in report_sources().items():
        text = path.read_text(encoding="utf-8")
        figures.update(FIGURE_LINK.findall(text))
        text = FIGURE_LINK.sub(r"](figures/\1)", text)
        note = f"\n\n---\n*Generated file `{path.relative_to(ROOT).as_posix()}`, shown as written.*\n"
        files.append(File.generated(config, uri, content=text + note))
    for name in sorted(figures):
        if (FIGURES / name).is_file():
            files.append(File.generated(config, f"results/figures/{name}", abs_src_path=str(FIGURES / name)))
    return files
