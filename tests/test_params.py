"""Per-tensor parameters: mergekit's scalar, gradient and filter-list forms, t and precedence.

Every expected number below is worked out by hand from mergekit's rules (reference §3.2).
"""

from __future__ import annotations

import math

import pytest
import yaml

from streammerge.errors import RecipeError
from streammerge.params import (
    FilterRule,
    Gradient,
    evaluate,
    layer_index,
    layer_t,
    num_layers,
    parse_value,
    resolve,
)

MLP = "model.layers.2.mlp.down_proj.weight"
ATTN = "model.layers.2.self_attn.q_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"


def pv(value):
    return parse_value(value, "weight", "models[0] (ft)")


# --- forms -------------------------------------------------------------------------------------


def test_scalar_and_coercion():
    assert pv(0.25) == 0.25
    for raw, want in ((True, 1.0), (False, 0.0), (8, 8.0), (-1, -1.0), ("1e-3", 0.001)):
        got = pv(raw)
        assert got == want and type(got) is float, raw
    # a scalar ignores tensor name and t
    assert evaluate(pv(8), "lm_head.weight", 0.0) == 8.0
    assert evaluate(pv(True), MLP, 0.7) == 1.0


def test_gradient_interpolation_by_hand():
    g = pv([0, 1, 0.5])
    assert g == Gradient((0.0, 1.0, 0.5))
    # knots at t = 0, 0.5, 1
    assert g.at(0.0) == 0.0
    assert g.at(0.25) == 0.5  # halfway between 0 and 1
    assert g.at(0.5) == 1.0
    assert g.at(0.75) == 0.75  # halfway between 1 and 0.5
    assert g.at(1.0) == 0.5
    # four knots at t = 0, 1/3, 2/3, 1; t = 0.5 is halfway between 3 and 6
    assert Gradient((0.0, 3.0, 6.0, 9.0)).at(0.5) == 4.5
    # two knots: a straight line
    assert Gradient((2.0, 4.0)).at(0.25) == 2.5
    assert evaluate(g, "anything", 0.25) == 0.5


def test_one_knot_gradient_is_constant():
    g = pv([0.7])
    assert [g.at(t) for t in (0.0, 0.3, 1.0)] == [0.7, 0.7, 0.7]


def test_gradient_coerces_bools_and_ints():
    assert pv([1, True, False]) == Gradient((1.0, 1.0, 0.0))
    assert all(type(k) is float for k in pv([1, 2]).knots)


def test_gradient_rejects_bad_t_and_bad_knots():
    g = Gradient((0.0, 1.0))
    for t in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="t must be in"):
            g.at(t)
    with pytest.raises(ValueError, match="at least one knot"):
        Gradient(())
    with pytest.raises(ValueError, match="finite"):
        Gradient((0.0, math.inf))


def test_filter_list_first_match_wins():
    rules = pv(
        [
            {"filter": "self_attn", "value": 1},
            {"filter": "q_proj", "value": 2},  # also matches ATTN, but comes second
            {"value": 3},
        ]
    )
    assert rules == (
        FilterRule("self_attn", 1.0),
        FilterRule("q_proj", 2.0),
        FilterRule(None, 3.0),
    )
    assert evaluate(rules, ATTN, 0.0) == 1.0
    assert evaluate(rules, "model.layers.0.cross.q_proj.weight", 0.0) == 2.0
    assert evaluate(rules, MLP, 0.0) == 3.0
    # a default placed first shadows everything after it
    shadowing = pv([{"value": 7}, {"filter": "mlp", "value": 9}])
    assert evaluate(shadowing, MLP, 0.0) == 7.0


def test_star_missing_and_null_filter_match_everything():
    for rules in (
        pv([{"filter": "*", "value": 4}]),
        pv([{"value": 4}]),
        pv([{"filter": None, "value": 4}]),
    ):
        for tensor in ("lm_head.weight", "model.embed_tokens.weight", MLP):
            assert evaluate(rules, tensor, 0.0) == 4.0


def test_filter_is_a_plain_substring_not_a_glob():
    ten = "model.layers.10.mlp.up_proj.weight"
    assert evaluate(pv([{"filter": "layers.1", "value": 1}]), ten, 0.0) == 1.0  # substring!
    assert evaluate(pv([{"filter": "layers.1.", "value": 1}]), ten, 0.0) is None
    assert evaluate(pv([{"filter": "mlp*", "value": 1}]), ten, 0.0) is None  # '*' is literal


def test_filter_list_without_match_is_none():
    assert evaluate(pv([{"filter": "mlp", "value": 0.5}]), ATTN, 0.0) is None


def test_filter_rule_with_gradient_value():
    rules = pv([{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}])
    assert evaluate(rules, ATTN, 0.25) == 0.25
    assert evaluate(rules, MLP, 0.25) == 0.3


# --- t -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "want"),
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("model.decoder.layers.12.fc1.weight", 12),
        ("transformer.h.12.attn.c_attn.weight", 12),
        ("blocks.3.attn.qkv.weight", 3),
        ("layers.0.attention.wq.weight", 0),
        ("model.layers.3.mlp.experts.7.w1.weight", 3),  # the expert index is not a layer
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("lm_head.weight", None),
        ("transformer.wte.weight", None),
        ("model.shared_layers.4.weight", None),  # 'layers' must be a whole segment
        ("model.layers.x.weight", None),
    ],
)
def test_layer_index(tensor, want):
    assert layer_index(tensor) == want


def test_num_layers_from_llama_names():
    names = ["model.embed_tokens.weight"]
    for i in range(3):
        names += [
            f"model.layers.{i}.self_attn.q_proj.weight",
            f"model.layers.{i}.mlp.up_proj.weight",
            f"model.layers.{i}.input_layernorm.weight",
        ]
    names += ["model.norm.weight", "lm_head.weight"]
    assert num_layers(names) == 3
    assert num_layers(reversed(names)) == 3
    assert num_layers(["model.layers.5.mlp.up_proj.weight"]) == 6  # 1 + max index
    assert num_layers(["lm_head.weight"]) == 0
    assert num_layers([]) == 0


def test_layer_t():
    # 33 layers: t = i / 32
    assert layer_t("model.layers.0.mlp.up_proj.weight", 33) == 0.0
    assert layer_t("model.layers.8.mlp.up_proj.weight", 33) == 0.25
    assert layer_t("model.layers.32.mlp.up_proj.weight", 33) == 1.0
    # non-layer tensors sit at t = 0, including post-weights (final norm, lm_head)
    for tensor in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert layer_t(tensor, 33) == 0.0


def test_layer_t_one_layer_model():
    assert layer_t("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert layer_t("lm_head.weight", 1) == 0.0


def test_layer_t_out_of_range_is_a_bug():
    with pytest.raises(ValueError, match="outside"):
        layer_t("model.layers.4.mlp.up_proj.weight", 4)
    with pytest.raises(ValueError, match="outside"):
        layer_t("model.layers.0.mlp.up_proj.weight", 0)


# --- precedence --------------------------------------------------------------------------------


def test_model_setting_beats_global():
    assert resolve("weight", {"weight": 0.5}, {"weight": 0.1}, MLP, 0.0) == 0.5


def test_global_applies_when_model_has_none():
    assert resolve("weight", {}, {"weight": 0.1}, MLP, 0.0) == 0.1


def test_model_filter_list_without_match_falls_through_to_global():
    model = {"weight": pv([{"filter": "mlp", "value": 0.5}])}
    glob = {"weight": 0.1}
    assert resolve("weight", model, glob, MLP, 0.0) == 0.5
    assert resolve("weight", model, glob, ATTN, 0.0) == 0.1


def test_global_filter_list_without_match_is_none():
    glob = {"weight": pv([{"filter": "mlp", "value": 0.5}])}
    assert resolve("weight", {}, glob, ATTN, 0.0) is None
    assert resolve("weight", {}, {}, ATTN, 0.0) is None


def test_global_only_skips_the_model_level():
    assert resolve("lambda", {"lambda": 2.0}, {"lambda": 1.0}, MLP, 0.0, global_only=True) == 1.0
    assert resolve("lambda", {"lambda": 2.0}, {}, MLP, 0.0, global_only=True) is None


def test_resolve_uses_t():
    assert resolve("density", {"density": pv([1, 0])}, {}, MLP, 0.25) == 0.75


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("abc", "must be a number, got 'abc'"),
        (None, "got None"),
        (math.nan, "finite number, got nan"),
        (math.inf, "finite number, got inf"),
        ("inf", "finite number, got 'inf'"),
        (10**400, "finite number"),
        ([], "empty list"),
        ([0.5, {"value": 1}], "either only numbers"),
        ([{"value": 1}, 0.5], "either only numbers"),
        ([{"filtr": "mlp", "value": 1}], "unknown key(s) filtr"),
        ([{"filter": "mlp"}], "has no 'value'"),
        ([{"filter": "mlp", "value": None}], "has no 'value'"),
        ([{"filter": 12, "value": 1}], "[0].filter must be a string"),
        ([{"value": 1}, {"filter": "mlp", "value": "x"}], "[1].value must be a number, got 'x'"),
        ([{"value": []}], "[0].value: an empty list"),
        ([{"value": {"value": 1}}], "[0].value must be a number or a list of numbers"),
        ([{"value": [{"value": 1}]}], "[0].value[0]: gradient knots must be numbers"),
        ([{"value": [0.1, math.nan]}], "[0].value[1] must be a finite number"),
        ([[1, 2]], "[0]: gradient knots must be numbers, got [1, 2]"),
        ([0.5, "x"], "[1] must be a number, got 'x'"),
        ([0.5, None], "[1] must be a number, got None"),
        ({"filter": "mlp", "value": 0.5}, "must be inside a list"),
    ],
)
def test_validation_errors_name_the_key_and_value(value, fragment):
    with pytest.raises(RecipeError) as exc:
        parse_value(value, "weight", "models[1] (ft2)")
    msg = str(exc.value)
    assert msg.startswith("models[1] (ft2): 'weight'"), msg
    assert fragment in msg, msg


# --- a mergekit documentation-style recipe -----------------------------------------------------

DOC = """
models:
  - model: tuneA
    parameters:
      weight: 0.6
      density: [1.0, 0.7, 0.4]
  - model: tuneB
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - filter: self_attn
          value: [0.2, 0.8]
        - value: 0.3
      density: 0.5
parameters:
  normalize: true
  lambda: 1
"""


def test_mergekit_doc_example():
    doc = yaml.safe_load(DOC)
    a, b = (
        {k: parse_value(v, k, f"models[{i}]") for k, v in m["parameters"].items()}
        for i, m in enumerate(doc["models"])
    )
    glob = {k: parse_value(v, k, "parameters") for k, v in doc["parameters"].items()}
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{part}.weight"
        for i in range(5)
        for part in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")
    ]
    n = num_layers(names)
    assert n == 5  # t = i / 4

    def get(name, params, tensor, **kw):
        return resolve(name, params, glob, tensor, layer_t(tensor, n), **kw)

    # tuneA: density gradient over 5 layers, knots at t = 0, 0.5, 1
    dens_a = [get("density", a, f"model.layers.{i}.mlp.down_proj.weight") for i in range(5)]
    assert dens_a == pytest.approx([1.0, 0.85, 0.7, 0.55, 0.4])
    # non-layer tensors take the first knot, lm_head included (not the last one)
    for tensor in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert get("density", a, tensor) == 1.0
        assert get("weight", a, tensor) == 0.6

    # tuneB: weight filter list
    assert get("weight", b, "model.layers.2.mlp.down_proj.weight") == 0.5
    assert get("weight", b, "model.layers.0.self_attn.q_proj.weight") == pytest.approx(0.2)
    assert get("weight", b, "model.layers.1.self_attn.q_proj.weight") == pytest.approx(0.35)
    assert get("weight", b, "model.layers.4.self_attn.q_proj.weight") == pytest.approx(0.8)
    assert get("weight", b, "model.layers.3.input_layernorm.weight") == 0.3
    assert get("weight", b, "model.embed_tokens.weight") == 0.3
    assert get("weight", b, "lm_head.weight") == 0.3
    assert get("density", b, "model.layers.3.mlp.down_proj.weight") == 0.5

    # global (method-level) parameters, coerced to floats
    assert get("normalize", b, "lm_head.weight", global_only=True) == 1.0
    assert get("lambda", a, "model.layers.1.mlp.down_proj.weight", global_only=True) == 1.0
    # a per-model parameter set only at the top level reaches every model
    assert resolve("epsilon", a, {"epsilon": 0.15}, "lm_head.weight", 0.0) == 0.15
