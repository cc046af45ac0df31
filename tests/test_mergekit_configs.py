"""mergekit's example configs and its test-suite configs run unchanged apart from model paths.

The configs are data (``tests/mergekit_configs/``, placeholders for the model folders); the
models are local tiny ones (``tests/mergekit_models.py``). Each config runs through
:func:`streammerge.run_merge` (a few also through ``streammerge-yaml``) and its output is checked
against what mergekit 0.1.5's rules give: tensor names and shapes, the dtype rule (``out_dtype``,
else ``dtype``, else the base's), values equal to an independent computation (the in-memory
reference for ``models:`` configs, a stack built here from the inputs for ``slices:`` ones),
tokenizer files and chat templates, and, for frankenmerges and union tokenizers, a forward pass
in ``transformers``. mergekit itself is used only by ``bench/mergekit_configs.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit_models import all_configs, build, config_text, materialize
from safetensors import safe_open

from streammerge import parse_recipe, run_merge
from streammerge.errors import RecipeError
from streammerge.params import evaluate, parse_value
from streammerge.recipe import Recipe, load_recipe
from streammerge.reference import reference_merge

transformers = pytest.importorskip("transformers")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# files mergekit 0.1.5 copies from the donor (base_model, else a model) when it copies the tokenizer
MERGEKIT_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                            "tokenizer.model", "added_tokens.json", "merges.txt",
                            "chat_template.jinja", "chat_template.json")  # fmt: skip
FORWARD = ("orcamini-platy-44layer", "gpt2-small", "basic_gpt2_stack", "tok_source_union",
           "tok_slerp_union", "tok_force_token")  # fmt: skip
LAYERS_OUT = {"orcamini-platy-44layer": 44, "gpt2-small": 8, "basic_gpt2_stack": 24}


class Merged:
    def __init__(self, name: str, recipe_path: Path, recipe: Recipe, out: Path, models: Path):
        self.name, self.recipe_path, self.recipe, self.out = name, recipe_path, recipe, out
        self.doc: dict[str, Any] = yaml.safe_load(recipe_path.read_text())
        self.models = models

    def tensors(self) -> dict[str, torch.Tensor]:
        return load(self.out)


def load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mergekit_models")


@pytest.fixture(scope="module")
def merged(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Merged] = {}

    def get(name: str) -> Merged:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            path = materialize(name, models_dir, root)
            recipe = load_recipe(path)
            run_merge(recipe, root / "out", quiet=True)
            cache[name] = Merged(name, path, recipe, root / "out", models_dir)
        return cache[name]

    return get


def _model_refs(doc: dict[str, Any]) -> list[str]:
    if "models" in doc:
        return [m["model"] for m in doc["models"]]
    return [s["model"] for sl in doc["slices"] for s in sl["sources"]]


def _donor(doc: dict[str, Any]) -> Path:
    return Path(doc.get("base_model") or _model_refs(doc)[0])


_LAYER = re.compile(r"\.(layers|h)\.(\d+)\.")


def hand_stack(doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A passthrough ``slices:`` config's output built directly from the inputs: output layer
    ``j`` is the ``j``-th layer of the concatenated ranges; embeddings (``embed_tokens``,
    ``wte``, ``wpe``) from the first slice's model, everything else outside the layers from
    the last slice's; every tensor in the config's dtype."""
    dtype = DTYPES[doc["dtype"]]
    slices = [sl["sources"][0] for sl in doc["slices"]]
    out: dict[str, torch.Tensor] = {}
    j = 0
    for s in slices:
        src = load(Path(s["model"]))
        start, end = s["layer_range"]
        for i in range(start, end):
            for name, t in src.items():
                m = _LAYER.search(name)
                if m and int(m.group(2)) == i:
                    new = f"{name[: m.start()]}.{m.group(1)}.{j + i - start}.{name[m.end() :]}"
                    out[new] = t.to(dtype)
        j += end - start
    first, last = load(Path(slices[0]["model"])), load(Path(slices[-1]["model"]))
    for name in first:
        if _LAYER.search(name) is None:
            emb = re.search(r"(embed_tokens|wte|wpe)\.", name) is not None
            out[name] = (first if emb else last)[name].to(dtype)
    return out


def gradient_slerp_reference(doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """gradient-slerp.yml as mergekit runs it: its ``pattern:`` entries have no filter, so the
    first one's gradient applies to every tensor; its one slice spans both 40-layer models
    whole, so it is the ``models:`` merge below, computed by the in-memory reference."""
    src = doc["slices"][0]["sources"]
    plain = {
        "merge_method": "slerp",
        "base_model": doc["base_model"],
        "models": [{"model": s["model"]} for s in src],
        "parameters": {"t": doc["parameters"]["t"][0]["value"]},
        "dtype": doc["dtype"],
    }
    return {n: t for n, t, _ in reference_merge(parse_recipe(plain))}


def expected_tensors(m: Merged) -> dict[str, torch.Tensor]:
    if m.name == "gradient-slerp":
        return gradient_slerp_reference(m.doc)
    if "slices" in m.doc:
        return hand_stack(m.doc)
    return {n: t for n, t, _ in reference_merge(m.recipe)}


def expected_dtype(m: Merged, name: str) -> torch.dtype:
    """mergekit's rule: out_dtype, else dtype, else the tensor's dtype in the base."""
    key = m.doc.get("out_dtype") or m.doc.get("dtype")
    if key:
        return DTYPES[key]
    return load(_donor(m.doc))[name].dtype


@pytest.mark.parametrize("name", all_configs())
def test_config_runs_and_matches(name: str, merged) -> None:
    m = merged(name)
    got = m.tensors()
    want = expected_tensors(m)
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        g = got[n]
        assert g.shape == w.shape, n
        assert g.dtype == expected_dtype(m, n) == w.dtype, n
        assert torch.equal(g, w), n
    cfg = json.loads((m.out / "config.json").read_text())
    key = m.doc.get("out_dtype") or m.doc.get("dtype")
    if key:
        assert cfg.get("torch_dtype", cfg.get("dtype")) == key
    if name in LAYERS_OUT:
        assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == LAYERS_OUT[name]
    check_tokenizer(m)


def _vocab(path: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(path).get_vocab()


def _row(folder: Path, token: str) -> torch.Tensor:
    return load(folder)["model.embed_tokens.weight"][_vocab(folder)[token]]


def check_tokenizer(m: Merged) -> None:
    """What mergekit writes: the donor's tokenizer files copied as they are when no tokenizer
    key is given; else a tokenizer (and chat template) as mergekit's own tests check them."""
    doc, out = m.doc, m.out
    donor = _donor(doc)
    tokenizer_keys = {"tokenizer_source", "tokenizer", "chat_template"} & set(doc)
    if not tokenizer_keys:
        copied = [f for f in MERGEKIT_TOKENIZER_FILES if (donor / f).exists()]
        for f in copied:
            assert (out / f).read_bytes() == (donor / f).read_bytes(), f
        assert (out / "tokenizer.json").exists() == ("tokenizer.json" in copied)
        return
    vocab = _vocab(out)
    models = {k: Path(v) for k, v in _paths(doc).items()}
    if "chat_template" in doc:
        tok = transformers.AutoTokenizer.from_pretrained(out)
        want = doc["chat_template"]
        if want == "chatml":
            assert "<|im_start|>" in tok.chat_template
        else:
            assert tok.chat_template == want
        assert vocab == _vocab(donor)
        return
    source = doc.get("tokenizer_source") or doc["tokenizer"].get("source", "union")
    chatml, base = models.get("chatml"), Path(doc["base_model"])
    if source == "union":
        assert len(vocab) == 66
        assert {"<|im_start|>", "<|im_end|>"} <= set(vocab)
        assert not any(f"<UNUSED_{i}>" in vocab for i in range(4))  # no row in their model
        if "<|im_start|>" in vocab and m.doc["merge_method"] == "linear" and "tokenizer" not in doc:
            # union: a token only chatml has takes chatml's row in every model, so the
            # normalised linear merge gives that row back, up to float32 rounding of (3r)/3
            got, want = _row(out, "<|im_start|>"), _row(chatml, "<|im_start|>")
            assert torch.allclose(got, want, rtol=1e-6, atol=0)
    elif source == "base":
        assert vocab == _vocab(base)
    else:
        assert vocab == _vocab(Path(source))
    tokens = (doc.get("tokenizer") or {}).get("tokens") or {}
    for tok_name, rule in tokens.items():
        src = rule["source"]
        if isinstance(src, str):
            want_row = _row(Path(src), tok_name)
        else:
            folder = Path(src["model"])
            if "token_id" in src:
                want_row = load(folder)["model.embed_tokens.weight"][src["token_id"]]
            else:
                want_row = _row(folder, src["token"])
        assert torch.equal(_row(out, tok_name), want_row.to(torch.float32)), tok_name
    pad = (doc.get("tokenizer") or {}).get("pad_to_multiple_of")
    if pad:
        rows = load(out)["model.embed_tokens.weight"].shape[0]
        assert rows == 80 == json.loads((out / "config.json").read_text())["vocab_size"]
        assert len(vocab) == 66


def _paths(doc: dict[str, Any]) -> dict[str, str]:
    """Role -> folder of the tokenizer-test models a config uses."""
    roles = {}
    for ref in {*_model_refs(doc), doc.get("base_model")} - {None}:
        roles[Path(ref).name.removeprefix("model_")] = ref
    return roles


def test_gradient_slerp_pattern_is_ignored_with_a_warning(merged) -> None:
    m = merged("gradient-slerp")
    lines = m.recipe_path.read_text().splitlines()
    at = [i for i, t in enumerate(lines, 1) if t.strip().startswith("- pattern:")]
    warned = [w for w in m.recipe.warnings if "pattern" in w]
    assert len(warned) == 2
    for w, line in zip(warned, at, strict=True):
        assert w.startswith(f"{m.recipe_path}: line {line}: parameters: 't'")
        assert "mergekit ignores 'pattern:" in w and "applies to every tensor" in w
    assert "write 'filter: self_attn' to restrict it" in warned[0]
    # the reading mergekit does not have (pattern as a filter) gives another output, so the
    # equality in test_config_runs_and_matches does tell the two apart
    as_filter = json.loads(json.dumps(m.doc).replace('"pattern"', '"filter"'))
    got = m.tensors()
    mlp0 = "model.layers.0.mlp.up_proj.weight"
    filtered = {n: t for n, t, _ in reference_merge(_as_models(as_filter), only={mlp0})}
    assert not torch.equal(got[mlp0], filtered[mlp0])


def _as_models(doc: dict[str, Any]) -> Recipe:
    src = doc["slices"][0]["sources"]
    plain = {k: v for k, v in doc.items() if k != "slices"}
    plain["models"] = [{"model": s["model"]} for s in src]
    return parse_recipe(plain)


@pytest.mark.parametrize("name", FORWARD)
def test_output_loads_and_runs_forward(name: str, merged) -> None:
    m = merged(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(m.out, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(m.out)
    text = "<|im_start|> _tok_5 _tok_7 <|im_end|>" if "tok_" in name else "_tok_5 _tok_7 _tok_9"
    ids = tok(text, return_tensors="pt").input_ids
    if "tok_" in name:  # the union's new tokens are single ids
        assert tok.convert_tokens_to_ids("<|im_start|>") in ids[0].tolist()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    if name in LAYERS_OUT:
        assert model.config.num_hidden_layers == LAYERS_OUT[name]


@pytest.mark.parametrize("name", ["gradient-slerp", "orcamini-platy-44layer", "tok_source_union"])
def test_streammerge_yaml_cli(name: str, merged, tmp_path: Path) -> None:
    """The drop-in command writes the library's bytes and, for gradient-slerp, prints the
    'pattern' warnings as 'warning:' lines with their YAML line."""
    from streammerge.mergekit_cli import main as streammerge_yaml

    m = merged(name)
    r = CliRunner().invoke(streammerge_yaml, [str(m.recipe_path), str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    got, want = load(tmp_path / "o"), m.tensors()
    assert got.keys() == want.keys()
    for n, t in got.items():
        assert torch.equal(t, want[n]), n
    warned = [ln for ln in r.output.splitlines() if "mergekit ignores" in ln]
    if name == "gradient-slerp":
        assert len(warned) == 2 and all(ln.startswith("warning: ") for ln in warned)
        assert ": line 15: " in warned[0]
    else:
        assert not warned


def test_no_copy_tokenizer_leaves_tokenizer_out(merged, tmp_path: Path) -> None:
    from streammerge.mergekit_cli import main as streammerge_yaml

    m = merged("orcamini-platy-44layer")
    out = tmp_path / "o"
    r = CliRunner().invoke(streammerge_yaml, [str(m.recipe_path), str(out), "--no-copy-tokenizer"])
    assert r.exit_code == 0, r.output
    assert not any((out / f).exists() for f in MERGEKIT_TOKENIZER_FILES)
    assert (out / "config.json").exists()


def test_models_are_what_the_configs_assume(models_dir: Path) -> None:
    """The example family has the 40 layers the examples' layer ranges need, GPT-2 the 12
    ``gpt2-small``'s [0, 8] and mergekit's stack [0, 12] need."""
    paths = build(models_dir, {"ft1", "gpt2"}, 40)
    assert json.loads((paths["ft1"] / "config.json").read_text())["num_hidden_layers"] == 40
    assert json.loads((paths["gpt2"] / "config.json").read_text())["n_layer"] == 12
    assert "layer_range: [20, 40]" in config_text("orcamini-platy-44layer")


def test_pattern_key_in_a_rule() -> None:
    """mergekit ignores a rule's 'pattern': the entry matches everything, with one warning;
    beside a 'filter' the filter holds; any other unknown key is still refused."""
    notes: list[str] = []
    v = parse_value([{"pattern": "mlp", "value": 0.2}, {"value": 0.5}], "t", "parameters", notes)
    assert evaluate(v, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.2
    assert notes == [
        "parameters: 't'[0]: mergekit ignores 'pattern: mlp' in a filter rule, so this entry "
        "applies to every tensor as in mergekit; write 'filter: mlp' to restrict it"
    ]
    notes.clear()
    v = parse_value(
        [{"filter": "mlp", "pattern": "x", "value": 0.2}, {"value": 0.5}], "t", "p", notes
    )
    assert evaluate(v, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.5
    assert len(notes) == 1 and "keeps its filter 'mlp'" in notes[0]
    with pytest.raises(RecipeError, match=r"unknown key\(s\) filtr"):
        parse_value([{"filtr": "mlp", "value": 0.2}], "t", "p", [])


def test_nuslerp_without_a_base_interpolates_the_models(merged) -> None:
    """mergekit's nuslerp without base_model is streammerge's ignore_base: the same tensors as
    the recipe that names an (ignored) base, computed by the reference."""
    m = merged("basic_nuslerp_nobase_rw0_fl0")
    assert "base_model" not in m.doc
    named = {**m.doc, "base_model": str(build(m.models, {"model_c"})["model_c"])}
    named["parameters"] = {**m.doc["parameters"], "ignore_base": True}
    want = {n: t for n, t, _ in reference_merge(parse_recipe(named))}
    got = m.tensors()
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert torch.equal(got[n], t), n
    # and not the task-vector interpolation around model_c
    with_base = {**named, "parameters": m.doc["parameters"]}
    other = {n: t for n, t, _ in reference_merge(parse_recipe(with_base))}
    assert any(not torch.equal(got[n], other[n]) for n in other)


def test_karcher_takes_an_unlisted_base_as_the_last_model(merged) -> None:
    """mergekit 0.1.5 adds a base_model missing from models: to karcher's inputs, last; the
    output equals the recipe that lists it last, and differs from the mean of a and b alone."""
    m = merged("basic_karcher")
    base = m.doc["base_model"]
    assert [e.path for e in m.recipe.models][-1] == Path(base)
    listed = {**m.doc, "models": [*m.doc["models"], {"model": base}]}
    want = {n: t for n, t, _ in reference_merge(parse_recipe(listed))}
    got = m.tensors()
    for n, t in want.items():
        assert torch.equal(got[n], t), n
    alone = {k: v for k, v in m.doc.items() if k != "base_model"}
    other = {n: t for n, t, _ in reference_merge(parse_recipe(alone))}
    assert any(not torch.equal(got[n], other[n]) for n in other)
