"""The README's commands stay true: each parses with the real job's parser, and the quick ones run.

The long ones (train, score, evaluate on real archives) are what `make demo` runs end to end.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex

import pytest
from conftest import REPO, run_cli

README = (REPO / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    """Every `fetaliqa ...` / `python -m jobs....` command in the README's bash blocks, as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            words = shlex.split(line)
            if "--" in words:  # `ray job submit ... -- python -m jobs.score ...`
                words = words[words.index("--") + 1:]
            if words[:1] == ["fetaliqa"] and len(words) > 1:
                commands.append(["jobs." + words[1], *words[2:]])
            elif words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("jobs."):
                commands.append(words[2:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_every_command():
    assert {c[0] for c in COMMANDS} >= {"jobs.synth", "jobs.info", "jobs.train", "jobs.score", "jobs.evaluate",
                                        "jobs.report"}
    assert "make demo" in README and "make test" in README


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda c: " ".join(c)[:60])
def test_each_readme_command_parses_with_the_real_parser(argv):
    module = importlib.import_module(argv[0])
    module.build_parser().parse_args(argv[1:])  # SystemExit on an unknown flag or a bad value


def test_the_quick_readme_commands_run(tmp_path):
    for argv in (c for c in COMMANDS if c[0] in {"jobs.synth", "jobs.info"}):
        result = run_cli(*argv, cwd=tmp_path, timeout=180)
        assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr[-2000:]}"
    assert (tmp_path / "out" / "small" / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv").exists()


def test_the_readme_benchmark_commands_parse():
    """Benchmarks are timed, not tested; their README command lines must still be valid."""
    lines = [line.split("#", 1)[0].split() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
             for line in block.splitlines() if line.startswith(".venv/bin/python benchmarks/")]
    assert lines
    for words in lines:
        spec = importlib.util.spec_from_file_location("benchmark", REPO / words[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(words[2:])


def test_the_readme_snippets_read_a_real_scoring_output(cls_scores):
    """The "Reading the outputs" snippet (pyarrow, pandas, DuckDB) runs as written on a real run's output."""
    from fetaliqa.score.ledger import read_table
    from fetaliqa.score.schema import CASES, FRAMES

    out = cls_scores
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert snippets, "the README shows no Python snippet"
    scope = {"out": out}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), scope)

    frames = read_table(out, FRAMES)
    assert scope["frames"].sort_by([("case_id", "ascending"), ("frame", "ascending")]).equals(
        frames.sort_by([("case_id", "ascending"), ("frame", "ascending")]))
    assert sorted(scope["cases"]["case_id"]) == sorted(read_table(out, CASES)["case_id"].to_pylist())
    positive = frames.filter(frames["positive"]).sort_by([("score", "descending")])
    assert [round(s, 6) for _, _, s in scope["best"]] == [round(s, 6) for s in positive["score"].to_pylist()[:5]]
