"""The README and docs/ against the tree: its size, the results files they cite, the modules they tell users to run."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README_LIMIT = 15_000  # bytes (issue 24)


def docs_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def results_files() -> list[str]:
    return sorted(p.name for p in RESULTS.iterdir() if p.is_file())


def test_readme_is_at_most_15_kb():
    assert (ROOT / "README.md").stat().st_size <= README_LIMIT


def test_results_files_are_named_by_machine_and_suite_not_by_run():
    names = results_files()
    assert names
    assert [n for n in names if re.search(r"run[0-9]+", n)] == []
    assert [n for n in names if not re.fullmatch(r"[a-z0-9]+-[a-z0-9.-]+\.(json|png)", n)] == []


def test_every_results_file_is_cited_by_the_docs():
    text = docs_text()
    assert [n for n in results_files() if n not in text] == []


def test_every_cited_results_file_exists():
    """Names that look like a results file of a machine we have results for (cpu-..., h200-...) must exist."""
    machines = "|".join(sorted({n.split("-")[0] for n in results_files()}))
    cited = set(re.findall(rf"(?<![\w.-])(?:{machines})-[\w.-]*\w\.(?:json|png)\b", docs_text()))
    assert cited
    assert sorted(cited - set(results_files())) == []


def documented_modules() -> set[str]:
    sources = [docs_text()] + [p.read_text() for p in (ROOT / "benchmarks").rglob("*.py")]
    return {m for text in sources for m in re.findall(r"python -m (bytedeploy(?:\.\w+)+)", text)}


def test_every_module_the_docs_run_exists():
    modules = documented_modules()
    assert "bytedeploy.benchmarks.gpu_bench" in modules
    assert sorted(m for m in modules if importlib.util.find_spec(m) is None) == []


def test_every_benchmark_module_says_what_it_is_for():
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.splitlines()[0].strip(), f"{path.relative_to(ROOT)} has no purpose line"
