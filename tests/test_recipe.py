"""Recipe parsing: mergekit-style YAML in, a validated Recipe or a RecipeError naming the fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from streammerge import RecipeError, load_recipe, parse_recipe


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Empty model folders: the recipe only checks that they exist."""
    out = {}
    for name in ("base", "ft1", "ft2", "ft3"):
        out[name] = tmp_path / "models" / name
        out[name].mkdir(parents=True)
    return out


def cabs_doc(f: dict[str, Path], **extra) -> dict:
    return {
        "merge_method": "cabs",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 0.5}},
            {"model": str(f["ft2"]), "parameters": {"weight": 1.5, "n_val": 1, "m_val": 8}},
            {"model": str(f["ft3"])},
        ],
        "parameters": {"n_val": 2, "m_val": 4},
        **extra,
    }


def ta_doc(f: dict[str, Path]) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f[k]), "parameters": {"weight": w}}
            for k, w in (("ft1", 1.0), ("ft2", -0.25))
        ],
    }


def params_of(r, tensor="model.layers.0.mlp.weight", t=0.0):
    """Every model's resolved parameters for one tensor."""
    return [r.model_params(k, tensor, t) for k in range(len(r.models))]


def test_cabs_recipe(folders):
    r = parse_recipe(cabs_doc(folders))
    assert r.method == "cabs"
    assert r.base == folders["base"].resolve()
    assert [m.path for m in r.models] == [folders[k].resolve() for k in ("ft1", "ft2", "ft3")]
    assert [m.name for m in r.models] == [str(folders[k]) for k in ("ft1", "ft2", "ft3")]
    # per-model n_val/m_val override the global ones; CABS defaults the weight to 1
    got = [(p.weight, p.n, p.m) for p in params_of(r)]
    assert got == [(0.5, 2, 4), (1.5, 1, 8), (1.0, 2, 4)]
    assert r.dtype == torch.float32 and r.out_dtype is None
    opts = r.options("model.layers.0.mlp.weight", 0.0)
    assert (opts.tail_policy, opts.overlap_policy) == ("keep_topn_padded", "strict")
    assert r.warnings == ()


def test_default_n_val_aliases_and_options(folders):
    doc = cabs_doc(folders, compute_dtype="bf16", out_dtype="float16")
    doc["parameters"] = {"default_n_val": 3, "default_m_val": 6, "tail_policy": "zero",
                         "overlap_policy": "fill"}  # fmt: skip
    r = parse_recipe(doc)
    assert [(p.n, p.m) for p in params_of(r)] == [(3, 6), (1, 8), (3, 6)]
    opts = r.options("x", 0.0)
    assert (opts.tail_policy, opts.overlap_policy) == ("zero", "fill")
    assert (r.dtype, r.out_dtype) == (torch.bfloat16, torch.float16)
    assert r.warnings == ()


def test_task_arithmetic_recipe(folders):
    r = parse_recipe(ta_doc(folders))
    assert r.method == "task_arithmetic"
    assert [p.weight for p in params_of(r)] == [1.0, -0.25]


def test_global_weight_is_the_default(folders):
    doc = ta_doc(folders)
    doc["models"][1] = str(folders["ft2"])  # bare string form
    doc["parameters"] = {"weight": 0.75}
    assert [p.weight for p in params_of(parse_recipe(doc))] == [1.0, 0.75]


def test_base_listed_among_models_is_the_base(folders):
    doc = cabs_doc(folders)
    doc["models"].insert(1, {"model": str(folders["base"]), "parameters": {"weight": 9.0}})
    r = parse_recipe(doc)
    assert r.base == folders["base"].resolve()
    assert [m.path.name for m in r.models] == ["ft1", "ft2", "ft3"]


def test_pruning_order_by_written_path_or_folder_name(folders):
    doc = cabs_doc(folders, pruning_order=["ft3", str(folders["ft1"]), "ft2"])
    r = parse_recipe(doc)
    assert [m.path.name for m in r.models] == ["ft3", "ft1", "ft2"]
    assert [p.weight for p in params_of(r)] == [1.0, 0.5, 1.5]  # parameters travel along


@pytest.mark.parametrize(
    ("order", "fragments"),
    [
        (["ft3", "ft1", "ft9", "ft2"], ["pruning_order", "'ft9'"]),
        (["ft1", "ft2", "ft1", "ft3"], ["pruning_order", "'ft1'", "twice"]),
        (["ft1", "ft3"], ["pruning_order", "missing", "ft2"]),
    ],
    ids=["unknown", "duplicate", "missing"],
)
def test_bad_pruning_order(folders, order, fragments):
    with pytest.raises(RecipeError) as e:
        parse_recipe(cabs_doc(folders, pruning_order=order))
    for frag in fragments:
        assert frag in str(e.value)


def test_unknown_keys_and_parameters_warn(folders):
    doc = cabs_doc(folders, frobnicate=True)
    doc["parameters"]["density"] = 0.5
    doc["models"][0]["parameters"]["epsilon"] = 0.1
    r = parse_recipe(doc)
    assert len(r.models) == 3
    for name in ("frobnicate", "density", "epsilon"):
        assert sum(name in w for w in r.warnings) == 1, (name, r.warnings)


def set_key(doc: dict, path: str, value) -> None:
    """Set the value at a '/'-separated path of mapping keys and list indices."""
    *parents, last = path.split("/")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value


# case: (recipe kind, key path, new value ("{ft1}" names a folder), message fragments)
INVALID = {
    "n > m": ("cabs", "models/1/parameters/n_val", 9, ["n_val", "9", "8"]),
    "m < 1": ("cabs", "parameters/m_val", 0, ["m_val", "0"]),
    "non-integer n": ("cabs", "parameters/n_val", 2.5, ["n_val", "integer", "2.5"]),
    "n as text": ("cabs", "parameters/n_val", "two", ["n_val", "'two'"]),
    "no n:m at all": ("cabs", "parameters", {}, ["n_val", "m_val"]),
    "weight not a number": ("cabs", "models/0/parameters/weight", "heavy", ["weight", "'heavy'"]),
    "weight missing": ("ta", "models/1/parameters", {}, ["weight", "models[1]"]),
    "weight gradient with text": ("ta", "models/0/parameters/weight", [1, "x"], ["weight", "'x'"]),
    "unknown method": ("cabs", "merge_method", "kracher", ["merge_method", "'kracher'", "karcher"]),
    "density above 1": ("ta", "models/0/parameters/density", [0.5, 1.5], ["density", "1.5"]),
    "n_val gradient": ("cabs", "parameters/n_val", [1, 2], ["n_val", "gradient"]),
    "no models": ("cabs", "models", [], ["models"]),
    "only the base": ("ta", "models", ["{base}"], ["model"]),
    "unknown dtype": ("cabs", "dtype", "int4", ["dtype", "'int4'"]),
    "unknown out_dtype": ("cabs", "out_dtype", "fp8", ["out_dtype", "'fp8'"]),
    "bad tail_policy": ("cabs", "parameters/tail_policy", "drop", ["tail_policy", "'drop'"]),
    "bad overlap_policy": ("cabs", "parameters/overlap_policy", "sum", ["overlap_policy", "'sum'"]),
    "slices recipe": ("cabs", "slices", [{"sources": []}], ["slices"]),
    "LoRA reference": ("cabs", "models/0/model", "{ft1}+lora", ["LoRA"]),
    "model listed twice": ("ta", "models/1/model", "{ft1}", ["twice"]),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_values_raise_recipe_error(folders, case):
    kind, key, value, fragments = INVALID[case]
    doc = cabs_doc(folders) if kind == "cabs" else ta_doc(folders)
    names = {k: str(v) for k, v in folders.items()}
    if isinstance(value, str):
        value = value.format(**names)
    elif isinstance(value, list) and value and isinstance(value[0], str):
        value = [v.format(**names) for v in value]
    set_key(doc, key, value)
    with pytest.raises(RecipeError) as e:
        parse_recipe(doc)
    msg = str(e.value)
    assert "\n" not in msg
    for path in sorted(names.values(), key=len, reverse=True):  # digits in tmp paths
        msg = msg.replace(path, "<path>")
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_missing_base_model(folders):
    doc = cabs_doc(folders)
    del doc["base_model"]
    with pytest.raises(RecipeError, match="base_model"):
        parse_recipe(doc)


def test_missing_model_folder_is_named(folders, tmp_path):
    doc = cabs_doc(folders)
    doc["models"][2]["model"] = "models/ft-typo"
    with pytest.raises(RecipeError, match="not found") as e:
        parse_recipe(doc, tmp_path)
    assert "'models/ft-typo'" in str(e.value) and "models[2]" in str(e.value)


def test_hub_id_says_download_first(folders, tmp_path):
    doc = cabs_doc(folders)
    doc["base_model"] = "meta-llama/Llama-3.2-1B"
    with pytest.raises(RecipeError, match="not found") as e:
        parse_recipe(doc, tmp_path)
    msg = str(e.value)
    assert "local folders only" in msg
    assert "huggingface-cli download meta-llama/Llama-3.2-1B --local-dir DIR" in msg


# --------------------------------------------------------------------------------------------
# Files and relative paths


def write_recipe(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def relative_doc() -> dict:
    return {
        "merge_method": "cabs",
        "base_model": "models/base",
        "models": [{"model": "models/ft1"}, {"model": "models/ft2"}],
        "parameters": {"n_val": 2, "m_val": 4},
    }


def make_dirs(root: Path) -> Path:
    for name in ("base", "ft1", "ft2"):
        (root / "models" / name).mkdir(parents=True)
    return root


def test_relative_paths_fall_back_to_the_recipe_folder(tmp_path, monkeypatch):
    here = make_dirs(tmp_path / "project" / "recipes")
    recipe = write_recipe(here / "merge.yaml", relative_doc())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = load_recipe(recipe)
    assert r.base == (here / "models" / "base").resolve()
    assert [m.path for m in r.models] == [(here / "models" / n).resolve() for n in ("ft1", "ft2")]
    assert [m.name for m in r.models] == ["models/ft1", "models/ft2"]


def test_relative_paths_prefer_the_current_directory(tmp_path, monkeypatch):
    here = make_dirs(tmp_path / "project" / "recipes")
    cwd = make_dirs(tmp_path / "cwd")
    recipe = write_recipe(here / "merge.yaml", relative_doc())
    monkeypatch.chdir(cwd)
    r = load_recipe(recipe)
    assert r.base == (cwd / "models" / "base").resolve()
    assert [m.path for m in r.models] == [(cwd / "models" / n).resolve() for n in ("ft1", "ft2")]


def test_errors_in_a_file_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = relative_doc() | {"parameters": {"n_val": 5, "m_val": 4}}
    recipe = write_recipe(make_dirs(tmp_path / "sub") / "r.yaml", doc)
    with pytest.raises(RecipeError, match="n_val") as e:
        load_recipe(recipe)
    assert str(recipe) in str(e.value)


@pytest.mark.parametrize(
    "text",
    ["merge_method: cabs\nmodels: [\n  - model: a\n", "a: b\n\tc: d\n", "key: 'unterminated\n"],
)
def test_yaml_syntax_error_names_the_file(tmp_path, text):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="YAML") as e:
        load_recipe(recipe)
    assert str(recipe) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "", "42\n"])
def test_recipe_must_be_a_mapping(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert str(recipe) in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)
