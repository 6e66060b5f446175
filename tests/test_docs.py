"""The README's configuration reference is the schema's (it cannot go stale)."""
from conftest import ROOT
from exitnas.cli.config import reference_markdown


def test_readme_holds_the_generated_config_reference():
    assert reference_markdown() in (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.strip().splitlines() if not line.startswith("#")]
    assert lines[0].endswith("exitnas run search_spaces/quickstart.yaml --run-dir runs/quickstart")
    assert lines[1].endswith('pip install -e ".[test]" && python -m pytest -q')
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -q || rc=$?" in ci  # the README's command, then the slow tests
    assert "python -m pytest -q -m slow || rc=$?" in ci
