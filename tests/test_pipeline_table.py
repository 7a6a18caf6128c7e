"""README.md's table of supported pipelines is the one the registry gives (s2fast/adapters/table.py)."""

import pytest

from s2fast.adapters import _FAMILIES, table
from s2fast.adapters.base import FamilyAdapter


def test_readme_table_is_generated_from_the_registry():
    text = table.README.read_text(encoding="utf-8")
    assert table.replace_table(text, table.render()) == text, "run: python -m s2fast.adapters.table"
    assert table.main(["--check"]) == 0


def test_every_registered_pipeline_has_one_row():
    names = [row[0].strip("`") for row in table.rows()]
    assert names[:len(_FAMILIES)] == list(_FAMILIES)
    assert "s2fast.digits.DigitsFlowPipeline" in names  # the project's own, registered through register_adapter
    assert len(names) == len(set(names))
    assert all(len(row) == len(table.HEADER) and all(row) for row in table.rows())


def test_check_finds_a_stale_table_and_the_generator_fixes_it(tmp_path):
    readme = tmp_path / "README.md"
    stale = f"intro\n{table.BEGIN}\n| old |\n{table.END}\nrest\n"
    readme.write_text(stale, encoding="utf-8")
    assert table.main(["--check", "--readme", str(readme)]) == 1
    assert readme.read_text(encoding="utf-8") == stale  # --check writes nothing
    assert table.main(["--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == f"intro\n{table.BEGIN}\n{table.render()}\n{table.END}\nrest\n"
    assert table.main(["--check", "--readme", str(readme)]) == 0
    with pytest.raises(ValueError, match="no table markers"):
        table.replace_table("no markers here", table.render())


def test_an_adapter_with_only_the_defaults_gets_a_sensible_row():
    class NewAdapter(FamilyAdapter):  # what a new family's adapter inherits for the table
        model_classes = ("NewModel",)

    assert table.row("NewPipeline", NewAdapter) == (
        "`NewPipeline`", "test_pipeline_table", "NewModel", FamilyAdapter.cfg_style, "the pipeline's own", "yes", "—")
    NewAdapter.family, NewAdapter.refuses, NewAdapter.supports_fused_step = "new", ("IP-Adapter", "X"), False
    assert table.row("NewPipeline", NewAdapter)[1::4] == ("new", "no")
    assert table.row("NewPipeline", NewAdapter)[-1] == "IP-Adapter; X"
