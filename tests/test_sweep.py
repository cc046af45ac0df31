"""``streammerge sweep``: one merge per grid point, the first a full run and the others
replays of its masks when the method allows (CABS), full runs otherwise (TIES); each output
a finished merge whose shards equal a direct run with that point's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_family
from test_method_contract import recipe_doc

from streammerge import StreamMergeError, parse_recipe, run_merge
from streammerge.cli import main
from streammerge.methods import METHODS
from streammerge.sweep import grid_points, sweep
from streammerge.verify import verify_output

CHUNK, SHARD = 136, 3000


@pytest.fixture
def fam(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "m", k=2, dtype=torch.bfloat16, shards=(2, 1))


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


def direct(name: str, base: Path, fts: list[Path], weights: list[float], out: Path) -> None:
    doc = recipe_doc(METHODS[name].spec, base, fts)
    for item, w in zip(doc["models"], weights, strict=True):
        item["parameters"]["weight"] = w
    run_merge(parse_recipe(doc), out, chunk_elems=CHUNK, max_memory=2**32, shard_size=SHARD)


def test_grid_points_are_the_cartesian_product() -> None:
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    with pytest.raises(StreamMergeError):
        grid_points({})


@pytest.mark.parametrize("name", ["cabs", "ties"])
def test_every_point_equals_a_direct_run(name: str, fam, tmp_path: Path) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(METHODS[name].spec, base, fts))
    grid = {"ft1": [0.5, 1.5], str(fts[1]): [0.25]}
    results = sweep(recipe, tmp_path / "sweep", grid, chunk_elems=CHUNK, max_memory=2**32,
                    shard_size=SHARD)  # fmt: skip
    assert [p.replayed for p, _ in results] == [False, name == "cabs"]
    for p, _ in results:
        weights = [w for _, w in p.weights]
        direct(name, base, fts, weights, tmp_path / f"direct-{p.index}")
        assert shards(p.out_dir) == shards(tmp_path / f"direct-{p.index}")
        assert verify_output(p.out_dir).ok
    assert [w for _, w in results[1][0].weights] == [1.5, 0.25]


def test_cli_prints_a_table_and_refuses_unknown_models(fam, tmp_path: Path) -> None:
    base, fts = fam
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_doc(METHODS["cabs"].spec, base, fts)))
    out = tmp_path / "sweep"
    r = CliRunner().invoke(main, ["sweep", str(path), str(out), "--grid", "ft2=0.1,0.2",
                                  "--max-memory", "4GiB", "--shard-size", str(SHARD)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"| {out / 'point-001'} | 1 | 0.2 |" in r.output
    assert (out / "point-001" / "streammerge.json").exists()
    r = CliRunner().invoke(main, ["sweep", str(path), str(out), "--grid", "nope=1"])
    assert r.exit_code == 2 and "'nope' is not a model of the recipe" in r.output
