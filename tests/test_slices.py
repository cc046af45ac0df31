"""``slices:`` recipes (mergekit's layer ranges, per-slice bases and parameters, frankenmerges).

Every expected tensor here is built from the input tensors alone: the test renames layers,
picks the source of embeddings and heads, and evaluates gradients and precedence with its own
small rules (written from mergekit 0.1.5's ``plan.py`` and ``config.py``), then calls the
method's in-memory ``reference`` (checked against its chunked path by the contract suite).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.cli import main
from streammerge.journal import STATE_DIR
from streammerge.methods import METHODS, TensorId
from streammerge.synth import LlamaShape, generate_family

TALL = LlamaShape(hidden=16, intermediate=40, layers=40, heads=2, kv_heads=1, vocab=64)
SHORT = LlamaShape(hidden=16, intermediate=24, layers=4, heads=2, kv_heads=1, vocab=40)
AWKWARD = 72
"""Chunk length (elements) that splits most tensors mid-row."""


@pytest.fixture(scope="module")
def tall(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Base + 2 fine-tunes of 40 layers (orca_mini / Platypus2-13B have 40)."""
    return generate_family(tmp_path_factory.mktemp("tall"), TALL, n_finetunes=2, seed=5)


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return generate_family(tmp_path_factory.mktemp("short"), SHORT, n_finetunes=2, seed=6)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})  # noqa: SIM118
    return out


def at_layer(name: str, i: int) -> str:
    """``name`` moved to layer ``i`` (the test's own renaming)."""
    return re.sub(r"^model\.layers\.\d+\.", f"model.layers.{i}.", name)


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return None if m is None else int(m.group(1))


def layout(slices: list[list[tuple[Path, int, int]]]) -> dict[str, tuple[int, float, list]]:
    """Output name -> (slice, t, [(folder, input name) per source]) by mergekit's rules:
    layers numbered by position in the concatenation, t = i / (n - 1) inside each slice (1 for
    a one-layer slice), embeddings with the first slice and t = 0, norm and lm_head with the
    last slice and t = 0. ``slices``: per slice, (folder, start, end) per source."""
    first = tensors(slices[0][0][0])
    layer_names = sorted({at_layer(n, 0) for n in first if layer_of(n) is not None})
    out: dict[str, tuple[int, float, list]] = {}
    out["model.embed_tokens.weight"] = (
        0, 0.0, [(f, "model.embed_tokens.weight") for f, _, _ in slices[0]]
    )  # fmt: skip
    j = 0
    for si, srcs in enumerate(slices):
        n = srcs[0][2] - srcs[0][1]
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            for name in layer_names:
                out[at_layer(name, j)] = (si, t, [(f, at_layer(name, a + i)) for f, a, _ in srcs])
            j += 1
    for name in ("model.norm.weight", "lm_head.weight"):
        out[name] = (len(slices) - 1, 0.0, [(f, name) for f, _, _ in slices[-1]])
    return out


def gradient(knots: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers."""
    scaled = t * (len(knots) - 1)
    i0 = int(scaled)
    i1 = min(len(knots) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * knots[i0] + frac * knots[i1]


def doc_slices(slices: list[list[tuple[Path, int, int]]]) -> list[dict]:
    return [
        {"sources": [{"model": str(f), "layer_range": [a, b]} for f, a, b in srcs]}
        for srcs in slices
    ]


# --------------------------------------------------------------------------------------------
# Frankenmerge: orca_mini-platypus 44-layer stacking


def test_orcamini_style_stacking_is_the_input_layers_renumbered(tall, tmp_path):
    _, (ft1, ft2) = tall
    slices = [[(ft1, 0, 24)], [(ft2, 20, 40)]]  # overlapping ranges, as in the example
    recipe = parse_recipe({"merge_method": "passthrough", "slices": doc_slices(slices)})
    summary = run_merge(recipe, tmp_path / "out", chunk_elems=AWKWARD, max_memory=2**32)
    got = load_output(tmp_path / "out")
    want = layout(slices)
    assert set(got) == set(want)
    inputs = {f: tensors(f) for f in (ft1, ft2)}
    for name, (_, _, [(f, src)]) in want.items():
        assert same_bytes(got[name], inputs[f][src]), name
    # the embeddings come from the first slice's model, the head and norm from the last one's
    assert same_bytes(got["model.embed_tokens.weight"], inputs[ft1]["model.embed_tokens.weight"])
    assert same_bytes(got["lm_head.weight"], inputs[ft2]["lm_head.weight"])
    assert not same_bytes(got["lm_head.weight"], inputs[ft1]["lm_head.weight"])
    assert max(layer_of(n) or 0 for n in got) == 43
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 44
    assert summary.tensors == 2 + 44 * 9 + 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "output layers 24-43 <- " in card


def test_plan_shows_the_slice_layout(tall, tmp_path, capsys):
    _, (ft1, ft2) = tall
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {ft1}, layer_range: [0, 24]}}]\n"
        f"  - sources: [{{model: {ft2}, layer_range: [20, 40]}}]\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe), str(tmp_path / "out"), "--no-calibrate"], "streammerge")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"slice 0: output layers 0-23 <- {ft1}[0:24]" in out
    assert f"slice 1: output layers 24-43 <- {ft2}[20:40]" in out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Per-slice merges


SELF_ATTN = [0, 0.5, 0.3, 0.7, 1]
MLP = [1, 0.5, 0.7, 0.3, 0]


def slerp_t(name: str, si: int, t: float) -> float:
    """The recipe below: slice 1 overrides mlp only; everything else is the top level's."""
    if si == 1 and "mlp" in name:
        return gradient([0.2, 0.9], t)
    if "self_attn" in name:
        return gradient(SELF_ATTN, t)
    if "mlp" in name:
        return gradient(MLP, t)
    return 0.5


def test_gradient_slerp_per_slice_equals_reference(tall, tmp_path):
    """gradient-slerp.yml with two slices: gradients restart in each slice; per-role layer
    ranges differ in the second slice; a slice-level filter list falls through to the top."""
    base, (ft1, _) = tall
    slices = [[(base, 0, 24), (ft1, 0, 24)], [(base, 20, 40), (ft1, 16, 36)]]
    doc = {
        "merge_method": "slerp",
        "base_model": str(base),
        "slices": doc_slices(slices),
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": SELF_ATTN},
                {"filter": "mlp", "value": MLP},
                {"value": 0.5},
            ]
        },
    }
    doc["slices"][1]["parameters"] = {"t": [{"filter": "mlp", "value": [0.2, 0.9]}]}
    recipe = parse_recipe(doc)
    run_merge(recipe, tmp_path / "out", chunk_elems=AWKWARD, max_memory=2**32)
    got = load_output(tmp_path / "out")
    want = layout(slices)
    assert set(got) == set(want)
    inputs = {f: tensors(f) for f in (base, ft1)}
    method = METHODS["slerp"]
    for name, (si, t, [(bf, bn), (ff, fn)]) in want.items():
        b, ft = inputs[bf][bn], inputs[ff][fn]
        options = method.options({"t": slerp_t(name, si, t)})
        params = [method.model_params({})]
        r = method.reference(TensorId(name, b.numel(), tuple(b.shape)), b, [ft], params,
                             options, torch.float32)  # fmt: skip
        assert same_bytes(got[name], r.out.to(b.dtype).reshape(b.shape)), name
    # the second slice's first layer restarts the gradient (t = 0): q_proj is the base's
    assert same_bytes(
        got["model.layers.24.self_attn.q_proj.weight"],
        inputs[base]["model.layers.20.self_attn.q_proj.weight"],
    )


def test_parameter_precedence_source_slice_top(short, tmp_path):
    """Source > slice > top level; per-model filters match the *input* tensor name."""
    base, (ft1, ft2) = short
    slices = [
        [(base, 0, 3), (ft1, 0, 3), (ft2, 1, 4)],
        [(base, 2, 4), (ft1, 1, 3), (ft2, 0, 2)],
    ]
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "slices": doc_slices(slices),
        "parameters": {"weight": 0.25},
    }
    s0, s1 = doc["slices"]
    s0["parameters"] = {"weight": [1.0, 0.0]}
    s0["sources"][1]["parameters"] = {"weight": [{"filter": "layers.2.", "value": 2.0}]}
    s1["sources"][1]["parameters"] = {"weight": [{"filter": "layers.2.", "value": 3.0}]}
    recipe = parse_recipe(doc)
    run_merge(recipe, tmp_path / "out", chunk_elems=AWKWARD, max_memory=2**32)
    got = load_output(tmp_path / "out")

    def weights(name: str, si: int, t: float, inputs: list[str]) -> list[float]:
        ft1_in = inputs[1]
        if si == 0:
            w1 = 2.0 if "layers.2." in ft1_in else gradient([1.0, 0.0], t)
            return [w1, gradient([1.0, 0.0], t)]
        return [3.0 if "layers.2." in ft1_in else 0.25, 0.25]

    method = METHODS["task_arithmetic"]
    inputs = {f: tensors(f) for f in (base, ft1, ft2)}
    seen = set()
    want = layout(slices)
    assert set(got) == set(want)
    for name, (si, t, srcs) in want.items():
        b, f1, f2 = (inputs[f][n] for f, n in srcs)
        w = weights(name, si, t, [n for _, n in srcs])
        seen.add((si, tuple(w)))
        params = [method.model_params({"weight": x}) for x in w]
        r = method.reference(TensorId(name, b.numel(), tuple(b.shape)), b, [f1, f2], params,
                             method.options({}), torch.float32)  # fmt: skip
        assert same_bytes(got[name], r.out.to(b.dtype).reshape(b.shape)), name
    # output layer 4 reads ft1's input layer 2: the source filter hit it, not output layer 2
    assert (1, (3.0, 0.25)) in seen and (0, (2.0, 0.0)) in seen


def models_for(spec) -> int:
    return max(spec.min_models, min(2, spec.max_models or 2))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_streams_slices_like_its_reference(name, short, tmp_path):
    """Two slices whose roles read different layer ranges, for every registered method."""
    spec = METHODS[name].spec
    method = METHODS[name]
    base, fts = short
    k = models_for(spec)
    folders = ([base] if spec.needs_base else []) + fts[:k]
    ranges = [[(0, 2)] * len(folders), [(1, 4)] + [(0, 3)] * (len(folders) - 1)]
    slices = [[(f, a, b) for f, (a, b) in zip(folders, rs, strict=True)] for rs in ranges]
    doc = {"merge_method": name, "slices": doc_slices(slices), "parameters": dict(spec.example)}
    weights = [1.0, 0.6]
    if "weight" in spec.per_model:
        for s in doc["slices"]:
            for src, w in zip(s["sources"][-k:], weights, strict=True):
                src["parameters"] = {"weight": w}
    if spec.needs_base:
        doc["base_model"] = str(base)
    recipe = parse_recipe(doc)
    run_merge(recipe, tmp_path / "out", chunk_elems=200, max_memory=2**32)
    got = load_output(tmp_path / "out")
    want = layout(slices)
    assert set(got) == set(want)
    inputs = {f: tensors(f) for f in folders}
    values = {p.name: spec.example.get(p.name, p.default) for p in spec.params}
    per_model = {n: v for n, v in values.items() if spec.param(n).per_model}  # type: ignore[union-attr]
    options = method.options({n: v for n, v in values.items() if n not in per_model})
    params = [
        method.model_params({**per_model, **({"weight": w} if "weight" in per_model else {})})
        for w in weights[:k]
    ]
    for out_name, (_, _, srcs) in want.items():
        xs = [inputs[f][n] for f, n in srcs]
        b, models = xs[0], xs[-k:]  # without a base the first model stands in for it
        tid = TensorId(out_name, b.numel(), tuple(b.shape))
        r = method.reference(tid, b, models, params, options, torch.float32)
        assert same_bytes(got[out_name], r.out.to(b.dtype).reshape(b.shape)), out_name


# --------------------------------------------------------------------------------------------
# Resume


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and p.relative_to(out).parts[0] not in ("streammerge.json", STATE_DIR, "INCOMPLETE")
    }


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "streammerge", "run", *map(str, args), "--no-progress",
            "--chunk-elems", "48"]  # fmt: skip


def test_killed_slices_run_resumes_to_the_uninterrupted_bytes(short, tmp_path):
    """SIGKILL mid-merge, rerun: the bytes of an uninterrupted run. Slot 1 is filled by a
    different model in each slice, whose ranges differ from the base's."""
    base, (ft1, ft2) = short
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        "parameters: {weight: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {value: 0.5}]}\n"
        "slices:\n"
        f"  - sources: [{{model: {base}, layer_range: [0, 3]}},"
        f" {{model: {ft1}, layer_range: [1, 4]}}]\n"
        f"  - sources: [{{model: {base}, layer_range: [1, 4]}},"
        f" {{model: {ft2}, layer_range: [0, 3]}}]\n"
    )
    subprocess.run(cli(recipe, tmp_path / "ref"), check=True, timeout=300)
    ref = snapshot(tmp_path / "ref")
    out = tmp_path / "out"
    journal = out / STATE_DIR / "journal.jsonl"
    proc = subprocess.Popen(cli(recipe, out), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count('"chunk"') >= 120:  # of ~330
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "streammerge.json").exists()
    done = subprocess.run(cli(recipe, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed:" in done.stdout
    assert snapshot(out) == ref


# --------------------------------------------------------------------------------------------
# Bad slices: one error line before any work


def bad_cases(base: Path, ft1: Path, ft2: Path) -> dict[str, tuple[str, str]]:
    def s(*srcs: tuple[Path, object]) -> str:
        return "  - sources: [" + ", ".join(
            f"{{model: {f}, layer_range: {r}}}" for f, r in srcs
        ) + "]\n"  # fmt: skip

    slerp = f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nslices:\n"
    pt = "merge_method: passthrough\nslices:\n"
    return {
        "out of bounds": (pt + s((ft1, "[30, 44]")), r"layer_range \[30, 44\] is outside"),
        "lengths differ": (
            slerp + s((base, "[0, 10]"), (ft1, "[0, 12]")),
            "same number of layers",
        ),
        "both models and slices": (
            pt + s((ft1, "[0, 4]")) + f"models: [{{model: {ft2}}}]\n",
            "either 'models:' or 'slices:'",
        ),
        "empty range": (pt + s((ft1, "[3, 3]")), r"0 <= start < end"),
        "not a range": (pt + s((ft1, "[3]")), "two integers"),
        "base not a source": (slerp + s((ft1, "[0, 4]"), (ft2, "[0, 4]")), "must be one of"),
        "slot counts differ": (
            f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{weight: 1}}\n"
            "slices:\n"
            + s((base, "[0, 2]"), (ft1, "[0, 2]"))
            + s((base, "[2, 4]"), (ft1, "[2, 4]"), (ft2, "[2, 4]")),
            "same number of models",
        ),
        "model twice": (slerp + s((base, "[0, 2]"), (base, "[2, 4]")), "listed twice"),
        "passthrough of two": (pt + s((ft1, "[0, 2]"), (ft2, "[0, 2]")), "exactly one model"),
    }


@pytest.mark.parametrize(
    "case",
    ["out of bounds", "lengths differ", "both models and slices", "empty range", "not a range",
     "base not a source", "slot counts differ", "model twice", "passthrough of two"],
)  # fmt: skip
def test_bad_slices_get_one_error_line(tall, tmp_path, case, capsys):
    base, (ft1, ft2) = tall
    text, pattern = bad_cases(base, ft1, ft2)[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as e:  # the CLI in this process: any traceback would fail
        main(["plan", str(recipe), str(tmp_path / "out"), "--no-calibrate"], "streammerge")
    assert e.value.code not in (0, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_out_of_bounds_names_the_model_folder(tall, tmp_path):
    _, (ft1, _) = tall
    recipe = parse_recipe(
        {"merge_method": "passthrough",
         "slices": [{"sources": [{"model": str(ft1), "layer_range": [38, 41]}]}]}
    )  # fmt: skip
    from streammerge import StreamMergeError

    with pytest.raises(StreamMergeError, match=re.escape(str(ft1))):
        run_merge(recipe, tmp_path / "out", max_memory=2**32)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# --------------------------------------------------------------------------------------------
# config.json


def test_per_layer_config_lists_follow_the_slices(short, tmp_path):
    _, (ft1, ft2) = short
    a, b = tmp_path / "a", tmp_path / "b"
    for src, dst, tag in ((ft1, a, "a"), (ft2, b, "b")):
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["layer_types"] = [f"{tag}{i}" for i in range(4)]
        (dst / "config.json").write_text(json.dumps(cfg))
    recipe = parse_recipe(
        {"merge_method": "passthrough",
         "slices": doc_slices([[(a, 0, 3)], [(b, 1, 4)], [(a, 3, 4)]])}
    )  # fmt: skip
    run_merge(recipe, tmp_path / "out", max_memory=2**32)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7
    assert cfg["layer_types"] == ["a0", "a1", "a2", "b1", "b2", "b3", "a3"]


# --------------------------------------------------------------------------------------------
# transformers


def test_frankenmerge_loads_in_transformers_and_runs(tmp_path):
    transformers = pytest.importorskip("transformers")

    def tiny(seed: int, layers: int) -> transformers.LlamaForCausalLM:
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16)

    a, b = tiny(0, 4), tiny(1, 4)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    recipe = parse_recipe(
        {"merge_method": "passthrough",
         "slices": doc_slices([[(tmp_path / "a", 0, 3)], [(tmp_path / "b", 1, 4)]])}
    )  # fmt: skip
    run_merge(recipe, tmp_path / "out", chunk_elems=1000, max_memory=2**32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.bfloat16
    )
    assert merged.config.num_hidden_layers == 6
    # the same stack assembled here from the two models' state dicts
    expected = tiny(2, 6)
    sa, sb = a.state_dict(), b.state_dict()
    state = {n: x for n, x in sa.items() if (i := layer_of(n)) is not None and i < 3}
    state["model.embed_tokens.weight"] = sa["model.embed_tokens.weight"]
    state["model.norm.weight"] = sb["model.norm.weight"]
    state["lm_head.weight"] = sb["lm_head.weight"]
    for n, x in sb.items():
        if layer_of(n) is not None and layer_of(n) >= 1:
            state[at_layer(n, layer_of(n) + 2)] = x
    missing, unexpected = expected.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    # saved and loaded like `merged` (from_pretrained keeps the rotary buffers in float32)
    expected.save_pretrained(tmp_path / "expected")
    expected = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "expected", dtype=torch.bfloat16
    )
    for (n, p), (_, q) in zip(merged.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    with torch.no_grad():
        got, want = merged(ids).logits, expected(ids).logits
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_sparsifying_slices_merge_keeps_masks_inspect_works_remix_is_refused(short, tmp_path):
    """Masks are stored per model slot; inspect reads them (not the inputs: a slot is not one
    folder); remix and add say they do not support slices instead of misreading the store."""
    from streammerge import StreamMergeError
    from streammerge.inspect import inspect_merge
    from streammerge.remix import add_model, remix_merge

    base, (ft1, ft2) = short
    slices = [[(base, 0, 2), (ft1, 0, 2), (ft2, 0, 2)], [(base, 2, 4), (ft2, 1, 3), (ft1, 2, 4)]]
    doc = {"merge_method": "cabs", "base_model": str(base), "slices": doc_slices(slices),
           "parameters": {"n_val": 1, "m_val": 4}}  # fmt: skip
    out = tmp_path / "out"
    run_merge(parse_recipe(doc), out, max_memory=2**32)
    report = inspect_merge(out)
    assert "slices" in report.independent_note
    assert report.models == ("ft1 + ft2", "ft2 + ft1")
    for t in report.tensors:  # strict CABS at 1:4: each slot keeps at most a quarter, no overlap
        assert t.overlap == 0 and all(n <= -(-t.numel // 4) for n in t.kept), t.name
    ft3 = tmp_path / "ft3"
    subprocess.run(["cp", "-r", str(ft1), str(ft3)], check=True)
    with pytest.raises(StreamMergeError, match="do not support 'slices:'"):
        remix_merge(out, tmp_path / "new", {str(ft1): 0.5})
    with pytest.raises(StreamMergeError, match="do not support 'slices:'"):
        add_model(out, tmp_path / "new2", ft3, 0.5)
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


@pytest.mark.parametrize(
    "method, params",
    [("slerp", {"t": [0.1, 0.9, 0.4]}), ("ties", {"weight": [1.0, 0.3], "density": 0.5})],
)
def test_one_slice_over_every_layer_is_the_models_recipe(short, tmp_path, method, params):
    """mergekit turns ``models:`` into one such slice: the bytes must agree (shards and all)."""
    base, fts = short
    fts = fts[:1] if method == "slerp" else fts
    common = {"merge_method": method, "base_model": str(base), "parameters": params}
    models = parse_recipe({**common, "models": [{"model": str(f)} for f in fts]})
    sliced = parse_recipe(
        {**common, "slices": doc_slices([[(base, 0, 4), *((f, 0, 4) for f in fts)]])}
    )
    for name, recipe in (("m", models), ("s", sliced)):
        run_merge(recipe, tmp_path / name, chunk_elems=200, max_memory=2**32)
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    for s in shards:
        assert (tmp_path / "m" / s).read_bytes() == (tmp_path / "s" / s).read_bytes(), s
