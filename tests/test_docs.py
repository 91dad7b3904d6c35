"""The documentation runs: every ```python block of docs/ executes, every code name the docs and the theory
note cite exists, the note's tables are what analysis/theory_tables.py generates, and the site builds with
``mkdocs build --strict``.

Markers (an HTML comment on the line before a block, invisible on the site):

- ``<!-- docs-test: mock-pretrained -->``: the block loads a real checkpoint (SDXL, FLUX). It runs with
  ``from_pretrained`` of those pipeline classes replaced by tiny randomly initialised stand-ins of the same
  model classes (:func:`_tiny_pretrained`), so no weights are downloaded; the rest of the block is real.
- ``<!-- docs-test: skip -->``: the block is not run (for illustrative fragments); none is used at present,
  and a test keeps the number of skipped blocks at zero so a skip cannot hide a broken example.

Blocks of one page share one namespace and run in order, in a temporary working directory.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAPERS = ROOT / "papers"
PAGES = sorted(DOCS.rglob("*.md"))
MARKER = re.compile(r"<!--\s*docs-test:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """The ```python blocks of a page: (line number, code, marker or None)."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[: match.start()].rstrip().splitlines()
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(2), marker.group(1) if marker else None))
    return blocks


# ------------------------------------------------------------------------------ tiny stand-ins


class _TinyDenoiserPipeline:
    """A stand-in for a pipeline whose weights are not available: holds a tiny model of the real class
    and a real scheduler, and ``__call__`` runs the denoiser for the requested steps on random inputs."""

    def __init__(self, model: Any, inputs: Any, attribute: str) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        setattr(self, attribute, model)
        self._model, self._inputs = model, inputs
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    def __call__(self, prompt: Any, num_inference_steps: int = 2, **_: Any) -> SimpleNamespace:
        import numpy as np

        self.scheduler.set_timesteps(num_inference_steps)
        with torch.no_grad():
            for _step in range(num_inference_steps):
                out = self._model(**self._inputs(self._model)).sample
        image = np.asarray(out.float().clamp(-1, 1)[0].flatten()[:48].reshape(4, 4, 3))
        return SimpleNamespace(images=[image])


def _tiny_pretrained(kind: str) -> Any:
    from hopfield_aa.traces import testing

    if kind == "flux":
        return _TinyDenoiserPipeline(testing.tiny_flux(), testing.flux_inputs, "transformer")
    return testing.tiny_sd_pipeline()  # a real pipeline of the UNet family, full sampling loop


@contextlib.contextmanager
def mocked_pretrained() -> Iterator[None]:
    import diffusers

    names = {
        "StableDiffusionXLPipeline": "unet",
        "StableDiffusionPipeline": "unet",
        "StableDiffusion3Pipeline": "flux",
        "FluxPipeline": "flux",
        "DiffusionPipeline": "unet",
    }
    saved = {name: getattr(diffusers, name).__dict__.get("from_pretrained") for name in names}
    try:
        for name, kind in names.items():
            getattr(diffusers, name).from_pretrained = classmethod(
                lambda cls, *a, _k=kind, **kw: _tiny_pretrained(_k)
            )
        yield
    finally:
        for name, original in saved.items():
            cls = getattr(diffusers, name)
            if original is None:
                delattr(cls, "from_pretrained")
            else:
                cls.from_pretrained = original


# ------------------------------------------------------------------------------------ the tests


def test_every_docs_page_has_runnable_examples_or_is_reference() -> None:
    assert PAGES, "docs/ has no pages"
    for page in PAGES:
        if page.parent.name in {"reference", "results"} or page.name == "theory.md":
            continue  # generated from docstrings, or pages that show generated reports
        assert code_blocks(page), f"{page.relative_to(ROOT)} has no ```python example"


def test_no_example_is_skipped() -> None:
    skipped = [(p.name, line) for p in PAGES for line, _, marker in code_blocks(p) if marker == "skip"]
    assert skipped == []


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    for line, code, marker in code_blocks(page):
        if marker == "skip":
            continue
        if marker not in (None, "mock-pretrained"):
            pytest.fail(f"{page.name}:{line}: unknown marker {marker!r}")
        context = mocked_pretrained() if marker == "mock-pretrained" else contextlib.nullcontext()
        compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
        with context:
            try:
                exec(compiled, namespace)
            except Exception as error:  # the page and line make the failure findable
                raise AssertionError(
                    f"{page.relative_to(ROOT)}, block at line {line} failed: {error!r}"
                ) from error


# ---------------------------------------------------------------------------------- the CLI


DOCUMENTED_COMMANDS = {
    "verify": "howto/verify.md",
    "plot": "howto/verify.md",
    "train-reference": "howto/reference_model.md",
    "sample": "howto/reference_model.md",
}


def _subcommand_flags() -> dict[str, set[str]]:
    import argparse

    from hopfield_aa.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        name: {opt for action in sub._actions for opt in action.option_strings if opt.startswith("--")}
        - {"--help"}
        for name, sub in subparsers.choices.items()
    }


def test_every_flag_of_the_documented_commands_is_on_its_page() -> None:
    flags = _subcommand_flags()
    missing = []
    for command, page in DOCUMENTED_COMMANDS.items():
        assert command in flags, f"hopfield-aa has no subcommand {command!r}"
        text = (DOCS / page).read_text(encoding="utf-8")
        assert f"hopfield-aa {command}" in text, f"{page} does not name `hopfield-aa {command}`"
        missing += [f"{page}: {command} {flag}" for flag in sorted(flags[command]) if f"`{flag}" not in text]
    assert missing == []


# ------------------------------------------------------------------------------ generated pages


def _load_hook() -> Any:
    spec = importlib.util.spec_from_file_location("results_pages", DOCS / "_hooks" / "results_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_report_becomes_a_page_listed_in_the_overview_with_figure_links_rewritten() -> None:
    hook = _load_hook()
    sources = hook.report_sources()
    assert sources["results/reproduction.md"] == PAPERS / "reproduction.md"
    reports = {p.name for p in (ROOT / "analysis" / "results").glob("*.md")} - hook.SKIPPED
    assert {uri.removeprefix("results/") for uri in sources} == reports | {"reproduction.md"}
    table = hook.overview_table()
    for uri in sources:
        assert f"]({uri.removeprefix('results/')})" in table
    links = "![a](../analysis/figures/x.png) ![b](../figures/y.png)"
    assert hook.FIGURE_LINK.sub(r"](figures/\1)", links) == "![a](figures/x.png) ![b](figures/y.png)"


# ----------------------------------------------------------------------------- references


CODE_NAME = re.compile(r"`(hopfield_aa(?:\.\w+)+)`")
TEST_NAME = re.compile(r"`(tests/test_\w+\.py)::(\w+)`")
REFERENCED_FILES = [*PAGES, *sorted(PAPERS.glob("*.md"))]


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_cited_code_name_exists() -> None:
    missing = []
    for path in REFERENCED_FILES:
        for name in set(CODE_NAME.findall(path.read_text(encoding="utf-8"))):
            try:
                resolve(name)
            except (ImportError, AttributeError):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []


def test_every_cited_test_exists() -> None:
    missing = []
    cited = 0
    for path in REFERENCED_FILES:
        for file_name, test_name in set(TEST_NAME.findall(path.read_text(encoding="utf-8"))):
            cited += 1
            test_file = ROOT / file_name
            if not test_file.is_file() or test_name not in _test_functions(test_file):
                missing.append(f"{path.relative_to(ROOT)}: {file_name}::{test_name}")
    assert cited > 0
    assert missing == []


def test_the_reference_resolver_rejects_missing_names() -> None:
    with pytest.raises(AttributeError):
        resolve("hopfield_aa.geometry.no_such_function")
    assert "test_no_such_test" not in _test_functions(Path(__file__))


# --------------------------------------------------------------------------------- theory tables


def _load_theory_tables() -> Any:
    spec = importlib.util.spec_from_file_location("theory_tables", ROOT / "analysis" / "theory_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["theory_tables"] = module
    spec.loader.exec_module(module)
    return module


def test_theory_note_tables_are_the_generated_ones() -> None:
    tables = _load_theory_tables()
    note = (PAPERS / "theory.md").read_text(encoding="utf-8")
    generated = tables.render_tables(tables.load_results(tables.DEFAULT_RESULTS))
    assert generated, "no tables generated"
    for name, body in generated.items():
        assert tables.extract_table(note, name) == body.strip(), (
            f"table {name!r} of papers/theory.md differs from analysis/theory_tables.py; "
            "run `python analysis/theory_tables.py` to regenerate it"
        )


def test_theory_table_insertion_replaces_only_between_markers() -> None:
    tables = _load_theory_tables()
    text = "before\n<!-- table:x -->\nold\n<!-- /table:x -->\nafter\n"
    out = tables.insert_tables(text, {"x": "| a |\n|---|\n| 1 |"})
    assert out == "before\n<!-- table:x -->\n| a |\n|---|\n| 1 |\n<!-- /table:x -->\nafter\n"
    with pytest.raises(ValueError, match="y"):
        tables.insert_tables(text, {"y": "| b |"})


# ------------------------------------------------------------------------------------- the site


def test_every_make_all_step_accepts_the_quick_flags_it_is_given() -> None:
    """``make_all.py --quick`` passes each step its quick flags: every script must know them (a flag it
    does not define would stop the whole regeneration with an argparse error)."""
    spec = importlib.util.spec_from_file_location("make_all", ROOT / "analysis" / "make_all.py")
    assert spec is not None and spec.loader is not None
    make_all = importlib.util.module_from_spec(spec)
    sys.modules["make_all"] = make_all
    spec.loader.exec_module(make_all)
    for step in make_all.STEPS:
        if step.script is None or not step.quick_flag:
            continue
        source = (ROOT / step.script).read_text(encoding="utf-8")
        for flag in step.quick_flag:
            if flag.startswith("--"):
                assert f'"{flag}"' in source, f"{step.script} has no {flag} option"


def test_make_all_lists_every_step_and_names_missing_scripts() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "make_all.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for name in ("verify", "theory_tables", "docs_figures", "bench_entmax", "bench_anderson"):
        assert name in out
    assert ("missing" in out) == any(
        not (ROOT / "analysis" / f"{n}.py").exists()
        for n in (
            "bench_entmax",
            "bench_anderson",
            "bench_capture",
            "eval_reference",
            "eval_guidance",
            "bench_guidance_overhead",
        )
    )


def test_the_committed_verify_snapshot_has_results_but_no_counterexamples() -> None:
    """The snapshot keeps what the tables need; the counter-examples (megabytes) are regenerated by any run,
    and make_all's verify step removes them after writing."""
    snapshot = PAPERS / "data" / "verify"
    assert (snapshot / "results.json").is_file()
    assert not (snapshot / "counterexamples").exists()
    spec = importlib.util.spec_from_file_location("make_all", ROOT / "analysis" / "make_all.py")
    assert spec is not None and spec.loader is not None
    make_all = importlib.util.module_from_spec(spec)
    sys.modules["make_all"] = make_all  # dataclasses resolve their module by name
    spec.loader.exec_module(make_all)
    (verify,) = [step for step in make_all.STEPS if step.name == "verify"]
    assert f"{make_all.VERIFY_OUT}/counterexamples" in verify.prune


@pytest.mark.skipif(
    shutil.which("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')"
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: broken links, missing pages, unresolved API references fail the build."""
    start = time.perf_counter()
    result = subprocess.run(
        ["mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "geometry" / "index.html").is_file()
    print(f"mkdocs build --strict took {time.perf_counter() - start:.1f} s")
