"""README's configuration reference is the one the config classes generate."""

from __future__ import annotations

from pipeline import cli
from pipeline.config import config_reference, embed_reference
from tests.conftest import REPO


def test_readme_embeds_the_generated_config_reference():
    readme = (REPO / "README.md").read_text()
    assert embed_reference(readme) == readme, (
        "README.md's configuration reference differs from the config classes; regenerate it with "
        "`python -m pipeline.config README.md`"
    )


def test_reference_lists_every_key_with_type_default_and_allowed_values():
    reference = config_reference()
    assert "| `crf` | int | 16 | 0 to 51 | visually lossless for the untouched parts |" in reference
    assert "| `scheduler` | str | auto | auto, ddim, dpm++ |" in reference
    assert "**`resources.<stage>`**" in reference and "| `num_gpus` | float | at least -1 |" in reference
    # a comment block above a field describes it too
    assert "| `min_sync` | float | -1.0 | -1 to 1 | Active speaker:" in reference


def test_config_reference_command_prints_it(capsys):
    assert cli.main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == config_reference()
