"""The command line starts without the heavy imports, and answers mergekit's habits."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from streammerge.cli import main


def test_help_does_not_import_torch_or_numba():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from streammerge.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'numba', 'zarr') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_package_exports_load_on_first_use():
    import streammerge

    assert callable(streammerge.run_merge)
    assert callable(streammerge.read_mask)


def test_recipe_given_as_a_command_names_the_run_command(tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text("merge_method: linear\n")
    r = CliRunner().invoke(main, [str(recipe), "out"])
    assert r.exit_code == 2
    assert f"streammerge run {recipe} out" in r.output
    r = CliRunner().invoke(main, ["nosuchcommand"])
    assert r.exit_code == 2 and "No such command" in r.output


def test_shard_size_default_is_shown_plainly_and_parses_to_the_engine_default():
    from streammerge.defaults import DEFAULT_SHARD_SIZE, DEFAULT_SHARD_SIZE_TEXT
    from streammerge.memory import parse_size

    assert parse_size(DEFAULT_SHARD_SIZE_TEXT) == DEFAULT_SHARD_SIZE
    out = CliRunner().invoke(main, ["run", "--help"], terminal_width=200).output
    assert "[default: 5GB]" in out and "(5GB)" not in out
