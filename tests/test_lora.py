"""LoRA inputs (``model: MODEL+ADAPTER``): applied chunk by chunk as tensors stream.

Adapters are written here with torch and safetensors in PEFT's layout (key names and
``adapter_config.json`` as PEFT 0.x saves them; checked once against PEFT's
``merge_and_unload`` in a throwaway environment, PEFT is no dependency). Expected values are
computed independently in float64 from the factors.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_family
from safetensors.torch import load_file, save_file
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.cli import main
from streammerge.errors import StreamMergeError
from streammerge.lora import AdapterConfig, apply_full, apply_rows, lora_rows
from streammerge.mask_store import MemoryMaskStore
from streammerge.reference import reference_merge

PREFIX = "base_model.model."
FINISHED = ("streammerge.json", "model.safetensors.index.json")


def base_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def write_adapter(
    path: Path,
    base: dict[str, torch.Tensor],
    targets: dict[str, int],
    *,
    config: dict | None = None,
    embed: tuple[str, ...] = (),
    replace: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-style adapter folder; returns ``{tensor: (A, B)}`` as stored.

    ``targets``: base tensor name -> rank. Embeddings store ``lora_embedding_A`` as
    ``r x rows`` and ``lora_embedding_B`` as ``cols x r``; ``fan_in_fan_out`` Linear factors
    are ``A: r x rows``, ``B: cols x r``; a plain Linear ``A: r x cols``, ``B: rows x r``.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [], **(config or {})}
    tensors: dict[str, torch.Tensor] = {}
    factors = {}
    for name, r in targets.items():
        module = name.removesuffix(".weight")
        rows, cols = base[name].shape
        if name in embed or cfg.get("fan_in_fan_out"):
            a, b = torch.randn(r, rows, generator=g), torch.randn(cols, r, generator=g)
        else:
            a, b = torch.randn(r, cols, generator=g), torch.randn(rows, r, generator=g)
        a, b = (a * 0.3).to(dtype), (b * 0.3).to(dtype)
        if name in embed:
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = a
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        factors[name] = (a, b)
        cfg["target_modules"].append(module.rsplit(".", 1)[-1])
    for name, t in (replace or {}).items():
        tensors[f"{PREFIX}{name}"] = t
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return factors


def expected(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W + scale * B @ A`` (transposed for embeddings / fan_in_fan_out) in float64, and the
    magnitude of its terms ``|W| + scale * |B| @ |A|`` (what float32 rounding scales with)."""
    delta, mag = b.double() @ a.double(), b.double().abs() @ a.double().abs()
    if transposed:
        delta, mag = delta.t(), mag.t()
    return w.double() + scale * delta, w.double().abs() + scale * mag


def close_to(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Within one rounding to the output dtype of the float64 truth, plus float32
    accumulation error (a few float32 ulps of the terms' magnitude)."""
    truth, mag = want
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[got.dtype]
    return bool(((got.double() - truth).abs() <= eps * truth.abs() + 2.0**-20 * mag).all())


# --- the arithmetic -----------------------------------------------------------------------


def test_scale_rslora_and_patterns() -> None:
    cfg = AdapterConfig(
        r=8,
        alpha=16.0,
        rslora=False,
        fan_in_fan_out=False,
        rank_pattern={"mlp": 4, r"layers\.1\.attn": 2},
        alpha_pattern={"attn": 3.0},
    )
    assert cfg.scale("model.layers.0.mlp") == (4, 4.0)
    assert cfg.scale("model.layers.0.attn") == (8, 3.0 / 8)
    assert cfg.scale("model.layers.1.attn") == (2, 1.5)
    assert cfg.scale("model.layers.0.xmlp") == (8, 2.0)  # a pattern matches whole name parts
    rs = AdapterConfig(8, 16.0, True, False, {}, {})
    assert rs.scale("any") == (8, 16.0 / math.sqrt(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_any_chunking_gives_the_whole_tensor_bytes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    rows, cols, r = 37, 24, 5
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    left, right = torch.randn(rows, r, generator=g), torch.randn(r, cols, generator=g)
    whole = apply_full(w, left, right, 0.7)
    assert whole.dtype == dtype
    assert close_to(whole, expected(w, right, left, 0.7, False))
    flat = w.reshape(-1)
    for step in (1, 7, 23, 24, 25, 100, 887, 888):
        parts = [
            apply_rows(flat[s : s + step], s, cols, left, right, 0.7)
            for s in range(0, flat.numel(), step)
        ]
        assert same_bytes(torch.cat(parts).reshape(rows, cols), whole), step
    # the row blocks inside a chunk do not change the bytes either
    import streammerge.lora as lora_mod

    old = lora_mod.BLOCK_ELEMS
    try:
        lora_mod.BLOCK_ELEMS = 50
        assert same_bytes(
            apply_rows(flat[5:800], 5, cols, left, right, 0.7), whole.reshape(-1)[5:800]
        )
    finally:
        lora_mod.BLOCK_ELEMS = old
    assert lora_rows(left[:0], right, 1.0).shape == (0, cols)


# --- merges --------------------------------------------------------------------------------


@pytest.fixture
def lora_family(tmp_path: Path) -> dict[str, object]:
    """Base + two fine-tunes (bf16), an adapter on each fine-tune and one on the base."""
    base, fts = make_family(tmp_path / "models", k=2, dtype=torch.bfloat16)
    bt = base_tensors(base)
    ad1 = tmp_path / "lora1"
    f1 = write_adapter(
        ad1,
        bt,
        {"layer.0.attn.weight": 4, "layer.0.mlp.weight": 2, "embed.weight": 4},
        embed=("embed.weight",),
        seed=1,
        config={"use_rslora": True, "rank_pattern": {"mlp": 2}, "alpha_pattern": {"attn": 3}},
        replace={"layer.0.norm.weight": torch.full((24,), 0.5)},
    )
    ad2 = tmp_path / "lora2"
    f2 = write_adapter(
        ad2,
        bt,
        {"odd.weight": 3, "layer.0.mlp.weight": 4},
        seed=2,
        config={"r": 3, "rank_pattern": {"mlp": 4}},
        dtype=torch.bfloat16,
    )
    adb = tmp_path / "lora-base"
    fb = write_adapter(adb, bt, {"layer.0.mlp.weight": 2}, seed=3, config={"r": 2})
    return {"base": base, "fts": fts, "ad": [ad1, ad2, adb], "factors": [f1, f2, fb], "bt": bt}


def test_adapted_model_is_w_plus_scaled_ba(lora_family: dict, tmp_path: Path) -> None:
    """An independent check of the update: passthrough copies the adapted model; every
    tensor is the float64 ``W + scale * B @ A`` rounded once (rslora, rank and alpha
    patterns, an embedding, a replaced tensor, untouched tensors byte-identical)."""
    ft1, ad1 = lora_family["fts"][0], lora_family["ad"][0]
    recipe = parse_recipe({"merge_method": "passthrough", "models": [{"model": f"{ft1}+{ad1}"}]})
    run_merge(recipe, tmp_path / "out", chunk_elems=29, max_memory=2**32)
    got, ft = load_output(tmp_path / "out"), base_tensors(ft1)
    f = lora_family["factors"][0]
    attn = expected(ft["layer.0.attn.weight"], *f["layer.0.attn.weight"], 3 / math.sqrt(4), False)
    mlp = expected(ft["layer.0.mlp.weight"], *f["layer.0.mlp.weight"], 8 / math.sqrt(2), False)
    emb = expected(ft["embed.weight"], *f["embed.weight"], 8 / math.sqrt(4), True)
    for name, want in (
        ("layer.0.attn.weight", attn),
        ("layer.0.mlp.weight", mlp),
        ("embed.weight", emb),
    ):
        assert got[name].dtype == torch.bfloat16
        assert close_to(got[name], want), name
        assert not torch.equal(got[name], ft[name]), name
    assert torch.equal(got["layer.0.norm.weight"], torch.full((24,), 0.5, dtype=torch.bfloat16))
    for name in ("odd.weight", "scalar", "position_ids"):
        assert same_bytes(got[name], ft[name]), name


def test_fan_in_fan_out(tmp_path: Path) -> None:
    """``(B @ A).T`` for GPT-2's Conv1D layout, on a model sharded over three files."""
    base, _ = make_family(tmp_path / "m", k=1, dtype=torch.float32, shards=(3,))
    assert (base / "model.safetensors.index.json").exists()
    bt = {}
    for shard in base.glob("model-*.safetensors"):
        bt.update(load_file(shard))
    f = write_adapter(
        tmp_path / "ad",
        bt,
        {"layer.0.mlp.weight": 3},
        config={"r": 3, "lora_alpha": 6, "fan_in_fan_out": True},
    )
    recipe = parse_recipe(
        {"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'ad'}"}]}
    )
    run_merge(recipe, tmp_path / "out", chunk_elems=31, max_memory=2**32)
    got = load_output(tmp_path / "out")["layer.0.mlp.weight"]
    assert close_to(got, expected(bt["layer.0.mlp.weight"], *f["layer.0.mlp.weight"], 2.0, True))


def lora_recipe(fam: dict, method: str, base_adapter: bool = True, **params: object):
    base, (ft1, ft2), (ad1, ad2, adb) = fam["base"], fam["fts"], fam["ad"]
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": f"{base}+{adb}" if base_adapter else str(base),
            "models": [
                {"model": f"{ft1}+{ad1}", "parameters": {"weight": 1.0}},
                {"model": f"{ft2}+{ad2}", "parameters": {"weight": 0.6}},
            ],
            "parameters": params,
        }
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [("task_arithmetic", {}), ("cabs", {"n_val": 2, "m_val": 4}), ("ties", {"density": 0.5})],
)
def test_stream_equals_reference_at_awkward_chunks(
    lora_family: dict, tmp_path: Path, method: str, params: dict
) -> None:
    """Two adapters on two fine-tunes and one on the base: the streamed output equals the
    in-memory reference byte for byte whatever the chunk length (none a multiple of 24)."""
    recipe = lora_recipe(lora_family, method, **params)
    ref = {name: t for name, t, _ in reference_merge(recipe)}
    outputs = []
    for chunk in (7, 53, 1000):
        out = tmp_path / f"out-{chunk}"
        run_merge(recipe, out, chunk_elems=chunk, max_memory=2**32, mask_store=MemoryMaskStore())
        got = load_output(out)
        assert set(got) == set(ref)
        for name, want in ref.items():
            assert same_bytes(got[name], want), (chunk, name)
        outputs.append(got)
    plain = {n: t for n, t, _ in reference_merge(lora_recipe(lora_family, method, False, **params))}
    assert not same_bytes(plain["layer.0.mlp.weight"], ref["layer.0.mlp.weight"])  # base adapter


def test_two_adapters_on_one_base(lora_family: dict, tmp_path: Path) -> None:
    """``base_model: B``, ``models: [B+l1, B+l2]``: the same folder with different adapters
    is two models, neither is the base; task arithmetic adds both updates."""
    base, (ad1, ad2, _) = lora_family["base"], lora_family["ad"]
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [
                {"model": f"{base}+{ad1}", "parameters": {"weight": 1.0}},
                {"model": f"{base}+{ad2}", "parameters": {"weight": 1.0}},
            ],
        }
    )
    assert [m.adapter for m in recipe.models] == [ad1, ad2]
    run_merge(recipe, tmp_path / "out", chunk_elems=41, max_memory=2**32)
    got = load_output(tmp_path / "out")
    for name, want, _ in reference_merge(recipe):
        assert same_bytes(got[name], want), name
    bt, (f1, f2, _) = lora_family["bt"], lora_family["factors"]
    truth, mag = expected(
        bt["layer.0.mlp.weight"], *f1["layer.0.mlp.weight"], 8 / math.sqrt(2), False
    )
    delta, mag2 = expected(torch.zeros(50, 24), *f2["layer.0.mlp.weight"], 8 / 4, False)
    # three roundings to bf16: each adapted model, then the merge
    w = bt["layer.0.mlp.weight"].double()
    room = 2.0**-8 * (truth.abs() + (truth + delta).abs() + (w + delta).abs()) + 2.0**-20 * mag
    assert (
        (got["layer.0.mlp.weight"].double() - truth - delta).abs() <= room + mag2 * 2.0**-20
    ).all()
    assert not close_to(got["layer.0.mlp.weight"], (truth, mag))  # both updates are in
    # the same adapter twice is one model listed twice
    with pytest.raises(StreamMergeError, match="listed twice"):
        parse_recipe(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [
                    {"model": f"{base}+{ad1}", "parameters": {"weight": 1.0}},
                    {"model": f"{base}+{ad1}", "parameters": {"weight": 1.0}},
                ],
            }
        )


def test_resume_refuses_a_changed_adapter(lora_family: dict, tmp_path: Path) -> None:
    recipe = lora_recipe(lora_family, "task_arithmetic")
    out = tmp_path / "out"
    seen: list[str] = []

    def stop(report: object) -> None:
        seen.append(report.name)  # type: ignore[attr-defined]
        if len(seen) == 2:
            raise KeyboardInterrupt  # an interrupted run: journal kept, no marker

    with pytest.raises(KeyboardInterrupt):
        run_merge(recipe, out, chunk_elems=7, max_memory=2**32, on_tensor=stop)
    assert not (out / "streammerge.json").exists()
    ad2 = lora_family["ad"][1]
    weights = ad2 / "adapter_model.safetensors"
    st = weights.stat()
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1  # same names, shapes, dtypes and size; mtime kept below
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    with pytest.raises(StreamMergeError, match=r"lora2.*--restart") as err:
        run_merge(recipe, out, chunk_elems=7, max_memory=2**32)
    assert "input" in str(err.value)
    assert not (out / "streammerge.json").exists()
    summary = run_merge(recipe, out, max_memory=2**32, restart=True)  # the current adapter
    got = load_output(out)
    for name, want, _ in reference_merge(recipe):
        assert same_bytes(got[name], want), name
    marker = json.loads((out / "streammerge.json").read_text())
    assert any(k.endswith(f"+{ad2}") for k in marker["digest"]["inputs"])
    assert summary.tensors == len(got)
    verify = CliRunner().invoke(main, ["verify", str(out), "--inputs"])
    assert verify.exit_code == 0, verify.output


# --- refusals ------------------------------------------------------------------------------


def _recipe_file(
    tmp_path: Path, model_ref: str, base: Path, method: str = "task_arithmetic"
) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(
        f"merge_method: {method}\nbase_model: {base}\n"
        f"models:\n  - model: {model_ref}\n    parameters: {{weight: 1.0}}\n"
        + ("parameters: {n_val: 2, m_val: 4}\n" if method == "cabs" else "")
    )
    return p


def refused(args: list[str], out: Path, *fragments: str) -> str:
    """One ``error:`` line holding every fragment, exit 2, no traceback, no finished output."""
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("compiling the merge")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    for name in FINISHED:
        assert not (out / name).exists()
    return lines[0]


CASES = {
    "dora": ({"use_dora": True}, None, ("adapter_config.json", "DoRA")),
    "no-target": (
        {},
        {"missing.proj.lora_A.weight": (2, 24), "missing.proj.lora_B.weight": (24, 2)},
        ("adapter_model.safetensors", "missing.proj.lora_A.weight", "missing.proj.weight"),
    ),
    "shape": (
        {},
        {"layer.0.attn.lora_A.weight": (4, 23), "layer.0.attn.lora_B.weight": (24, 4)},
        ("layer.0.attn.lora_A.weight", "[4, 23]", "layer.0.attn.weight"),
    ),
    "rank": (
        {"r": 8},
        {"layer.0.attn.lora_A.weight": (4, 24), "layer.0.attn.lora_B.weight": (24, 4)},
        ("layer.0.attn.lora_A.weight", "rank 8"),
    ),
    "half-pair": (
        {},
        {"layer.0.attn.lora_A.weight": (4, 24)},
        ("layer.0.attn.lora_A.weight", "lora_B"),
    ),
    "unknown-key": (
        {},
        {"layer.0.attn.lora_magnitude_vector": (24,)},
        ("lora_magnitude_vector", "not a LoRA factor"),
    ),
    "replace-missing": ({}, {"lm_head.weight": (37, 24)}, ("lm_head.weight", "no tensor")),
    "replace-shape": ({}, {"layer.0.norm.weight": (25,)}, ("layer.0.norm.weight", "[25]")),
    "peft-type": ({"peft_type": "IA3"}, None, ("adapter_config.json", "IA3")),
    "bad-r": ({"r": 0}, None, ("adapter_config.json", "'r'")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_one_error_line(tmp_path: Path, case: str) -> None:
    base, (ft,) = make_family(tmp_path / "m", k=1)
    config, keys, fragments = CASES[case]
    ad = tmp_path / "ad"
    write_adapter(ad, base_tensors(base), {"layer.0.mlp.weight": 4}, config=config)
    if keys is not None:
        save_file(
            {f"{PREFIX}{k}": torch.zeros(s) for k, s in keys.items()},
            ad / "adapter_model.safetensors",
        )
    out = tmp_path / "out"
    line = refused(
        ["run", str(_recipe_file(tmp_path, f"{ft}+{ad}", base)), str(out)], out, *fragments
    )
    assert str(ad) in line
    assert not out.exists()  # refused before the output folder is created


def test_missing_or_invalid_config_and_pickle_adapter(tmp_path: Path) -> None:
    base, (ft,) = make_family(tmp_path / "m", k=1)
    ad, out = tmp_path / "ad", tmp_path / "out"
    write_adapter(ad, base_tensors(base), {"layer.0.mlp.weight": 4})
    recipe = str(_recipe_file(tmp_path, f"{ft}+{ad}", base))
    (ad / "adapter_config.json").write_text("{not json")
    refused(["run", recipe, str(out)], out, f"{ad / 'adapter_config.json'}", "unreadable")
    (ad / "adapter_config.json").unlink()
    refused(["run", recipe, str(out)], out, f"{ad / 'adapter_config.json'}", "not found")
    write_adapter(ad, base_tensors(base), {"layer.0.mlp.weight": 4})
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    refused(["run", recipe, str(out)], out, "adapter_model.bin", "streammerge convert")
    refused(
        ["run", str(_recipe_file(tmp_path, f"{ft}+{tmp_path / 'nope'}", base)), str(out)],
        out,
        "LoRA adapter",
        "nope",
        "not found",
    )
    refused(
        ["run", str(_recipe_file(tmp_path, f"{ft}+{ad}+{ad}", base)), str(out)],
        out,
        "MODEL+ADAPTER",
    )


def test_pickle_only_model_points_at_convert(tmp_path: Path) -> None:
    """Through the real console: a ``.bin``-only model folder is refused, never unpickled."""
    base, _ = make_family(tmp_path / "m", k=1)
    binary = tmp_path / "bin-model"
    binary.mkdir()
    (binary / "pytorch_model.bin").write_bytes(b"not even read")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "streammerge",
        "run",
        str(_recipe_file(tmp_path, str(binary), base)),
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("compiling the merge")]
    assert len(lines) == 1 and "streammerge convert" in lines[0] and "pytorch_model.bin" in lines[0]
    assert not out.exists()


def test_where_lora_is_not_supported_yet(lora_family: dict, tmp_path: Path) -> None:
    base, (ft1, _), (ad1, _, _) = lora_family["base"], lora_family["fts"], lora_family["ad"]
    out = tmp_path / "out"
    recipe = _recipe_file(tmp_path, f"{ft1}+{ad1}", base)
    refused(["run", str(recipe), str(out), "--executor", "ray"], out, "LoRA", "ray")
    sliced = tmp_path / "sliced.yaml"
    sliced.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: '{ft1}+{ad1}', layer_range: [0, 1]}}]\n"
    )
    refused(["run", str(sliced), str(out)], out, "LoRA", "models: and base_model:")
    refused(
        ["sweep", str(recipe), str(tmp_path / "sw"), "--grid", "0=0.5,1.0"],
        tmp_path / "sw",
        "sweep",
        "LoRA",
    )


def test_plan_and_card_name_the_adapter(lora_family: dict, tmp_path: Path) -> None:
    base, (ft1, _), (ad1, _, _) = lora_family["base"], lora_family["fts"], lora_family["ad"]
    recipe, out = _recipe_file(tmp_path, f"{ft1}+{ad1}", base, "cabs"), tmp_path / "out"
    plan = CliRunner().invoke(main, ["plan", str(recipe), str(out), "--no-calibrate"])
    assert plan.exit_code == 0, plan.output
    assert not out.exists()
    run = CliRunner().invoke(main, ["run", str(recipe), str(out), "--no-progress"])
    assert run.exit_code == 0, run.output
    assert f"{ft1}+{ad1}" in (out / "README.md").read_text()
    remix = CliRunner().invoke(main, ["remix", str(out), str(tmp_path / "r"), "--weight", "0=2"])
    assert remix.exit_code == 2 and "LoRA" in remix.stderr, remix.output
