"""remix and add: byte-identical to a full run of the changed recipe, through the CLI.

A remix (new weights, stored masks) must equal ``run`` with those weights; an add (one more
model, pruned last) must equal ``run`` of the extended recipe, file for file, including signed
zeros: the family here has zeros and negative zeros in the base and zero task-vector entries.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from conftest import SHAPES, make_family, write_model

from streammerge import read_mask, run_merge
from streammerge.cli import main
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods import replay as replay_mod
from streammerge.methods.base import run_chunked
from streammerge.methods.replay import add_next, apply_masks

SHARD = 2000  # bytes: several output shards
CABS = METHODS["cabs"]


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def write_recipe(path: Path, base: Path, fts: list[Path], weights: list[float], **extra) -> Path:
    doc = {
        "merge_method": "cabs",
        "base_model": str(base),
        "models": [
            {"model": str(f), "parameters": {"weight": w}}
            for f, w in zip(fts, weights, strict=True)
        ],
        "parameters": {"n_val": 2, "m_val": 4},
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def full_run(recipe: Path, out: Path, chunk: int = 40) -> Path:
    run_merge(recipe, out, chunk_elems=chunk, shard_size=SHARD, max_memory=2**32)
    return out


def assert_same_files(a: Path, b: Path) -> None:
    """Every output file byte for byte (shards, index, config), except the run's timing and
    the model card (it records how the folder was made: run, remix or add)."""
    own = ("streammerge.json", "README.md")
    names = sorted(p.name for p in a.iterdir() if p.is_file() and p.name not in own)
    assert names == sorted(p.name for p in b.iterdir() if p.is_file() and p.name not in own)
    assert sum(n.endswith(".safetensors") for n in names) >= 2
    differ = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert differ == [], differ


def assert_same_masks(a: Path, b: Path, k: int) -> None:
    for name in SHAPES:
        if name != "position_ids":
            for i in range(k):
                assert torch.equal(read_mask(a, i, name), read_mask(b, i, name)), (i, name)


def zeros_family(root: Path, k: int, dtype=torch.bfloat16, seed=1, shards=(1,)):
    """Quantised base with many +0.0 and -0.0; fine-tunes with zero, sign-flipping deltas."""
    g = torch.Generator().manual_seed(seed)
    base_t, fts_t = {}, [{} for _ in range(k)]
    for name, shape in SHAPES.items():
        if name == "position_ids":
            base_t[name] = torch.arange(10).reshape(shape)
            for ft in fts_t:
                ft[name] = base_t[name].clone()
            continue
        b = torch.randint(-2, 3, shape, generator=g).float() / 64
        neg = torch.rand(shape, generator=g) < 0.5
        b = torch.where((b == 0) & neg, torch.tensor(-0.0), b)
        base_t[name] = b.to(dtype)
        for ft in fts_t:
            q = torch.randint(-3, 4, shape, generator=g).float() / 64
            f = b + q
            # some exact zeros of either sign where the base is zero too
            f = torch.where((b == 0) & (torch.rand(shape, generator=g) < 0.3), -b, f)
            ft[name] = f.to(dtype)
    base = write_model(root / "base", base_t, shards[0])
    fts = [
        write_model(root / f"ft{i + 1}", t, shards[(i + 1) % len(shards)])
        for i, t in enumerate(fts_t)
    ]
    return base, fts


# --- the pure functions against CABS itself ---------------------------------------------------


def signed_zero_inputs(n: int = 4096, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (n,), generator=g).float() / 8
    base = torch.where((base == 0) & (torch.rand(n, generator=g) < 0.5), -0.0, base)
    fts = []
    for _ in range(k):
        f = base + torch.randint(-3, 4, (n,), generator=g).float() / 8
        fts.append(torch.where(torch.rand(n, generator=g) < 0.2, -base, f))
    return base, fts


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [(1.0, 0.8, 0.6), (0.0, -1.0, 0.5), (1.0, 0.0, -0.25)])
@pytest.mark.parametrize("compiled", [True, False])
def test_add_next_equals_cabs_of_k_plus_1(out_dtype, weights, compiled, monkeypatch):
    if not compiled:  # the torch paths of CABS and of add_next
        monkeypatch.setattr(replay_mod.kernels, "enabled", lambda: False)
    base, fts = signed_zero_inputs()
    params = [ModelParams(w, 1, 4) for w in weights]  # 1:4 leaves free positions
    opts = MethodOptions()
    tid = TensorId("t", base.numel())
    old = run_chunked(CABS, tid, base, fts[:2], params[:2], opts, torch.float32, chunk=64)
    full = run_chunked(CABS, tid, base, fts, params, opts, torch.float32, chunk=64)
    old_out, want = old.out.to(out_dtype), full.out.to(out_dtype)
    got = add_next(base, fts[2], old_out, old.masks, params, opts, torch.float32, out_dtype)
    assert got.out.dtype == out_dtype
    assert torch.equal(got.out.view(torch.uint8), want.view(torch.uint8))  # signed zeros too
    for a, b in zip(got.masks, full.masks, strict=True):
        assert torch.equal(a, b)
    # discriminating: the old bytes are not simply kept where the new model claims nothing
    untouched = ~full.masks[2]
    flips = untouched & (old_out == 0)
    flips &= torch.signbit(old_out) & ~torch.signbit(want)
    if weights[2] > 0:
        assert int(flips.sum()) > 0


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("overlap", ["strict", "fill"])
def test_apply_masks_equals_cabs(overlap, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(replay_mod.kernels, "enabled", lambda: False)
    base, fts = signed_zero_inputs(k=3)
    params = [ModelParams(w, n, 4) for w, n in [(1.0, 3), (-0.5, 2), (0.0, 3)]]
    opts = MethodOptions(overlap_policy=overlap)
    res = run_chunked(CABS, TensorId("t", base.numel()), base, fts, params, opts, torch.float32)
    got = apply_masks(base, fts, res.masks, [p.weight for p in params], torch.float32)
    assert torch.equal(got.view(torch.int32), res.out.view(torch.int32))


@pytest.mark.parametrize("n", [4096 + 13, (1 << 18) + 4099])  # serial and threaded kernels
def test_compiled_replay_reads_bf16_inputs_as_the_torch_path(n, monkeypatch):
    """The compiled remix and add read bf16 chunks as they are (no float32 copies): the same
    bytes as the torch path, which widens first, on either side of the threading cut-off."""
    g = torch.Generator().manual_seed(n)
    base, fts = signed_zero_inputs(n=n, k=3)
    base = (base + torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
    fts = [(f + torch.randn(n, generator=g) * 0.01).to(torch.bfloat16) for f in fts]
    params = [ModelParams(w, 1, 4) for w in (1.0, -0.7, 0.3)]
    opts = MethodOptions()
    tid = TensorId("t", n)
    old = run_chunked(CABS, tid, base, fts[:2], params[:2], opts, torch.float32, chunk=1 << 20)
    old_out = old.out.to(torch.bfloat16)
    weights = [p.weight for p in params[:2]]
    compiled = apply_masks(base, fts[:2], old.masks, weights, torch.float32)
    added = add_next(base, fts[2], old_out, old.masks, params, opts, torch.float32,
                     torch.bfloat16)  # fmt: skip
    monkeypatch.setattr(replay_mod.kernels, "enabled", lambda: False)
    plain = apply_masks(base, fts[:2], old.masks, weights, torch.float32)
    assert torch.equal(compiled.view(torch.int32), plain.view(torch.int32))
    assert torch.equal(compiled.view(torch.int32), old.out.view(torch.int32))
    want = add_next(base, fts[2], old_out, old.masks, params, opts, torch.float32, torch.bfloat16)
    assert torch.equal(added.out.view(torch.int16), want.out.view(torch.int16))
    for a, b in zip(added.masks, want.masks, strict=True):
        assert torch.equal(a, b)


# --- end to end through the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_remix_equals_a_full_run(tmp_path, k):
    base, fts = make_family(tmp_path / "models", k=k, shards=(1, 2))
    old = full_run(
        write_recipe(tmp_path / "a.yaml", base, fts, [1.0, 0.8, 0.6][:k]), tmp_path / "a"
    )
    new_w = [0.3, -1.7, 2.5][:k]
    want = full_run(write_recipe(tmp_path / "b.yaml", base, fts, new_w), tmp_path / "b")
    weights = [f"--weight={f.name}={w}" for f, w in zip(fts, new_w, strict=True)]
    weights[0] = f"--weight={fts[0]}={new_w[0]}"  # the path as written in the recipe works too
    out = tmp_path / "remixed"
    r = cli("remix", old, out, *weights, "--chunk-elems", 24, "--shard-size", SHARD,
            "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "merged" in r.stdout
    assert_same_files(want, out)
    assert_same_masks(want, out, k)
    attrs = json.loads((out / "occupancy.zarr" / "zarr.json").read_text())["attributes"]
    assert [m["weight"] for m in attrs["models"]] == new_w
    assert [m["name"] for m in attrs["models"]] == [str(f) for f in fts]
    # a remix of the remix, changing one weight back: the original bytes
    back = tmp_path / "back"
    r = cli("remix", out, back, *[f"--weight=ft{i + 1}={w}" for i, w in
            enumerate([1.0, 0.8, 0.6][:k])], "--shard-size", SHARD, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert_same_files(old, back)


@pytest.mark.parametrize("out_dtype", [None, "float32", "float16"])
def test_add_equals_a_full_run_of_the_extended_recipe(tmp_path, out_dtype):
    base, fts = zeros_family(tmp_path / "models", k=3, shards=(2, 1))
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    weights = [1.0, -0.8, 0.7]
    two = full_run(write_recipe(tmp_path / "2.yaml", base, fts[:2], weights[:2], **extra),
                   tmp_path / "two")  # fmt: skip
    three = full_run(write_recipe(tmp_path / "3.yaml", base, fts, weights, **extra),
                     tmp_path / "three", chunk=64)  # fmt: skip
    # the earlier fine-tunes are not read: move them away
    for f in fts[:2]:
        f.rename(f.with_name(f.name + "-gone"))
    out = tmp_path / "added"
    r = cli("add", two, out, "--model", fts[2], "--weight", 0.7, "--chunk-elems", 56,
            "--shard-size", SHARD, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert_same_files(three, out)
    assert_same_masks(three, out, 3)
    # discriminating: somewhere the old bytes changed although the new model claimed nothing
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for s in sorted(d.glob("*.safetensors")):
            t |= load_file(s)
        return t

    old_t, new_t = tensors(two), tensors(three)
    changed = 0
    for name in SHAPES:
        if name == "position_ids":
            continue
        free = ~read_mask(three, 2, name)
        a, b = old_t[name][free], new_t[name][free]
        changed += int((torch.signbit(a) != torch.signbit(b)).sum())
    assert changed > 0
    attrs = json.loads((out / "occupancy.zarr" / "zarr.json").read_text())["attributes"]
    assert len(attrs["models"]) == 3 and attrs["models"][2]["weight"] == 0.7


def test_add_then_remix_and_n_m_override(tmp_path):
    base, fts = make_family(tmp_path / "models", k=3)
    two = full_run(write_recipe(tmp_path / "2.yaml", base, fts[:2], [1.0, 0.5]), tmp_path / "two")
    doc = yaml.safe_load((tmp_path / "2.yaml").read_text())
    doc["models"].append({"model": str(fts[2]), "parameters": {"weight": 0.9, "n_val": 1,
                                                                "m_val": 8}})  # fmt: skip
    doc["models"][0]["parameters"]["weight"] = 0.25
    (tmp_path / "3.yaml").write_text(yaml.safe_dump(doc))
    want = full_run(tmp_path / "3.yaml", tmp_path / "want")
    added = tmp_path / "added"
    r = cli("add", two, added, "--model", fts[2], "--weight", 0.9, "--n-val", 1, "--m-val", 8,
            "--shard-size", SHARD, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "remixed"
    r = cli("remix", added, out, "--weight", "ft1=0.25", "--shard-size", SHARD, "--no-progress")
    assert r.exit_code == 0, r.output
    assert_same_files(want, out)


# --- refusals: one clear line, nothing written ------------------------------------------------


def assert_refused(r: Result, *fragments: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


def test_refusals(tmp_path):
    base, fts = make_family(tmp_path / "models", k=3)
    r2 = write_recipe(tmp_path / "r.yaml", base, fts[:2], [1.0, 0.5])
    fill = full_run(write_recipe(tmp_path / "f.yaml", base, fts[:2], [1.0, 0.5],
                                 parameters={"n_val": 3, "m_val": 4, "overlap_policy": "fill"}),
                    tmp_path / "fill")  # fmt: skip
    assert_refused(cli("add", fill, tmp_path / "x", "--model", fts[2], "--weight", 1), "fill")
    tadrop = full_run(write_recipe(tmp_path / "t.yaml", base, fts[:2], [1.0, 0.5],
                                   parameters={"n_val": 2, "m_val": 4, "tadrop": 1}),
                      tmp_path / "tadrop")  # fmt: skip
    assert_refused(cli("add", tadrop, tmp_path / "x", "--model", fts[2], "--weight", 1), "TADrop")
    doc = yaml.safe_load(r2.read_text())
    doc.update(merge_method="ties", parameters={"density": 0.5})
    (tmp_path / "ties.yaml").write_text(yaml.safe_dump(doc))
    ties = full_run(tmp_path / "ties.yaml", tmp_path / "ties")
    assert_refused(cli("remix", ties, tmp_path / "x", "--weight", "ft1=2"), "ties", "sign")
    assert_refused(cli("add", ties, tmp_path / "x", "--model", fts[2], "--weight", 1), "CABS")
    ok = full_run(r2, tmp_path / "ok")
    assert_refused(cli("remix", ok, tmp_path / "x", "--weight", "nope=2"), "nope", "ft1, ")
    assert_refused(cli("add", ok, tmp_path / "x", "--model", fts[1], "--weight", 1), "already")
    assert_refused(
        cli("add", ok, tmp_path / "x", "--model", tmp_path / "missing", "--weight", 1), "missing"
    )
    (ok / "streammerge.json").unlink()  # looks unfinished
    assert_refused(cli("remix", ok, tmp_path / "x", "--weight", "ft1=2"), "not a finished merge")
    assert not (tmp_path / "x").exists()
    bad = cli("remix", ok, tmp_path / "x", "--weight", "ft1")
    assert bad.exit_code == 2 and "MODEL=VALUE" in bad.stderr


def test_interrupted_add_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    import streammerge.engine as engine
    from streammerge.remix import add_model

    base, fts = make_family(tmp_path / "models", k=3)
    two = full_run(write_recipe(tmp_path / "2.yaml", base, fts[:2], [1.0, 0.5]), tmp_path / "two")
    want = full_run(write_recipe(tmp_path / "3.yaml", base, fts, [1.0, 0.5, 0.9]), tmp_path / "3")
    out = tmp_path / "added"
    check = engine.Scheduler._check_stop  # called after each chunk is handed to the write lane
    calls = {"n": 0}

    def crash(self):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # a crash mid-merge: the journal has what was flushed
        check(self)

    monkeypatch.setattr(engine.Scheduler, "_check_stop", crash)
    monkeypatch.setattr(engine, "JOURNAL_INTERVAL_S", 0.0)  # journal every chunk at once
    kw = {"chunk_elems": 40, "shard_size": SHARD, "max_memory": 2**32}
    with pytest.raises(KeyboardInterrupt):
        add_model(two, out, fts[2], 0.9, **kw)
    assert (out / "INCOMPLETE").is_file() and not (out / "streammerge.json").exists()
    monkeypatch.setattr(engine.Scheduler, "_check_stop", check)
    summary = add_model(two, out, fts[2], 0.9, **kw)
    assert summary.resumed_chunks > 0
    assert_same_files(want, out)
    assert not (out / "INCOMPLETE").exists()
    again = cli("add", two, out, "--model", fts[2], "--weight", 0.9, "--no-progress")
    assert_refused(again, "finished merge", "--force")


@pytest.mark.parametrize(
    "params",
    [{"n_val": 3, "m_val": 4, "overlap_policy": "fill"}, {"n_val": 2, "m_val": 8, "tadrop": 1}],
    ids=["fill", "tadrop"],
)
def test_remix_fill_and_tadrop(tmp_path, params):
    """fill (overlapping masks) and TADrop (per-tensor n, from the stored densities)."""
    base, fts = make_family(tmp_path / "models", k=3)
    old = full_run(write_recipe(tmp_path / "a.yaml", base, fts, [1.0, 0.8, 0.6],
                                parameters=params), tmp_path / "a")  # fmt: skip
    want = full_run(write_recipe(tmp_path / "b.yaml", base, fts, [0.2, 0.8, -1.0],
                                 parameters=params), tmp_path / "b")  # fmt: skip
    out = tmp_path / "remixed"
    r = cli("remix", old, out, "--weight", "ft1=0.2", "--weight", "ft3=-1.0",
            "--shard-size", SHARD, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert_same_files(want, out)
    assert_same_masks(want, out, 3)


def test_remix_and_add_refuse_a_source_that_is_not_what_its_merge_wrote(tmp_path):
    """A deleted mask chunk would read back as zeros, a shrunk array would merge other masks,
    another merge's store copied in would be used silently: remix and add verify the store
    against the marker first (add verifies the shards too: it reads them as a model)."""
    base, fts = make_family(tmp_path / "models", k=3)
    ok = full_run(write_recipe(tmp_path / "r.yaml", base, fts[:2], [1.0, 0.5]), tmp_path / "ok")
    sparser = write_recipe(
        tmp_path / "o.yaml", base, fts[:2], [1.0, 0.9], parameters={"n_val": 1, "m_val": 4}
    )
    other = full_run(sparser, tmp_path / "other")
    remix = ("remix", "--weight", "ft1=2")
    add = ("add", "--model", fts[2], "--weight", 1)

    damaged = tmp_path / "damaged"
    shutil.copytree(ok, damaged)
    next(p for p in (damaged / "occupancy.zarr").rglob("c/*") if p.is_file()).unlink()
    assert_refused(cli(remix[0], damaged, tmp_path / "x", *remix[1:]), "occupancy store differs")

    swapped = tmp_path / "swapped"
    shutil.copytree(ok, swapped)
    shutil.rmtree(swapped / "occupancy.zarr")
    shutil.copytree(other / "occupancy.zarr", swapped / "occupancy.zarr")
    assert_refused(cli(remix[0], swapped, tmp_path / "x", *remix[1:]), "occupancy store differs")

    edited = tmp_path / "edited"
    shutil.copytree(ok, edited)
    shard = next(edited.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_refused(cli(add[0], edited, tmp_path / "x", *add[1:]), shard.name, "differs")
    assert not (tmp_path / "x").exists()
    # remix reads only the store: an edited shard is no reason to refuse it
    assert cli(remix[0], edited, tmp_path / "y", *remix[1:], "--no-progress").exit_code == 0
