"""Benchmark one merge on a synthetic preset: generate (if needed), run, measure, verify.

Usage::

    python bench/run.py 1b cabs --max-memory 1GiB [--root /tmp/sm-bench] [--verify] [--drop-caches]

Methods: every merge method, with the weights and densities of the mergekit baselines in
``shared/reference/baselines.md`` (CABS: 16:64, weights 1.0/0.8). Prints the command, then
one JSON line with wall time, peak RSS (kernel high-water mark) and peak anonymous RSS, and
with ``--verify`` whether every output tensor equals the in-memory reference byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from measure import drop_caches, measure  # noqa: E402

_MODELS = (
    "base_model: {root}/base\nmodels:\n"
    "  - model: {root}/ft1\n    parameters: {{weight: %s%s}}\n"
    "  - model: {root}/ft2\n    parameters: {{weight: %s%s}}\n"
)
BASELINES = {
    # weights as in the mergekit baselines of shared/reference/baselines.md
    "task_arithmetic": _MODELS % ("0.5", "", "0.5", ""),
    "cabs": _MODELS % ("1.0", "", "0.8", "") + "parameters: {{n_val: 16, m_val: 64}}\n",
    "ties": _MODELS % ("1.0", ", density: 0.25", "1.0", ", density: 0.25"),
    "dare_ties": _MODELS % ("0.5", ", density: 0.25", "0.5", ", density: 0.25"),
    "dare_linear": _MODELS % ("0.5", ", density: 0.25", "0.5", ", density: 0.25"),
    "magnitude": _MODELS % ("1.0", ", density: 0.25", "1.0", ", density: 0.25"),
    "linear": "models:\n  - model: {root}/ft1\n    parameters: {{weight: 0.5}}\n"
    "  - model: {root}/ft2\n    parameters: {{weight: 0.5}}\n",
}


def example_recipe(method: str) -> str:
    """The recipe of a method without a baseline: its registry example on ft1 (and ft2 where
    the method takes two or more models), with ``{root}`` left to format."""
    import yaml

    from streammerge.methods import METHODS

    spec = METHODS[method].spec
    k = 1 if spec.max_models == 1 else 2
    per_model = {n: v for n, v in spec.example.items() if n in spec.per_model}
    glob = {n: v for n, v in spec.example.items() if n not in spec.per_model}
    models = [
        {"model": f"{{root}}/ft{i + 1}", **({"parameters": dict(per_model)} if per_model else {})}
        for i in range(k)
    ]
    doc: dict = {"merge_method": method}
    if spec.needs_base:
        doc["base_model"] = "{root}/base"
    doc["models"] = models
    if glob:
        doc["parameters"] = glob
    # braces of flow mappings are doubled so that str.format leaves them alone
    text = yaml.safe_dump(doc, sort_keys=False)
    return text.replace("{", "{{").replace("}", "}}").replace("{{root}}", "{root}")


def _recipes() -> dict[str, str]:
    from streammerge.methods import METHODS

    texts = {m: example_recipe(m) for m in sorted(METHODS)}
    texts.update({m: f"merge_method: {m}\n{r}" for m, r in BASELINES.items()})
    return texts


RECIPES = _recipes()
"""Every registry method's recipe on a family (``{root}`` to format). No ``dtype:``: the
arithmetic runs in float32 and the output keeps the base's dtype, as mergekit does with
``dtype: float32`` and ``out_dtype`` set to the family's dtype (``compare.py`` writes that)."""


def ensure_family(preset: str, root: Path) -> Path:
    """Generate the synthetic family ``root/preset`` unless it is already complete; return it."""
    family = root / preset
    subprocess.run(
        [sys.executable, str(HERE / "generate.py"), preset, str(family), "--quiet"], check=True
    )
    return family


def write_recipe(preset: str, method: str, root: Path) -> Path:
    """Write ``root/<preset>-<method>.yaml`` (RECIPES[method] on the family) and return it."""
    recipe = root / f"{preset}-{method}.yaml"
    recipe.write_text(RECIPES[method].format(root=root / preset))
    return recipe


def merge_cmd(recipe: Path, out: Path, max_memory: str) -> list[str]:
    """The streammerge command line that merges ``recipe`` into ``out``."""
    return [sys.executable, "-m", "streammerge", "run", str(recipe), str(out),
            "--max-memory", max_memory, "--no-progress"]  # fmt: skip


def verify(recipe_path: Path, out: Path) -> tuple[int, list[str]]:
    """Compare every output tensor with the in-memory reference; return (checked, mismatches)."""
    import torch
    from safetensors import safe_open

    from streammerge.recipe import load_recipe
    from streammerge.reference import reference_merge

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    handles = {f: safe_open(out / f, framework="pt") for f in set(index.values())}
    bad, checked = [], 0
    for name, expected, _ in reference_merge(load_recipe(recipe_path)):
        got = handles[index[name]].get_tensor(name)
        same = (got.dtype, got.shape) == (expected.dtype, expected.shape) and torch.equal(
            got.flatten().view(torch.uint8), expected.flatten().view(torch.uint8)
        )
        checked += 1
        if not same:
            bad.append(name)
    return checked, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset")
    ap.add_argument("method", choices=sorted(RECIPES))
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    ap.add_argument("--verify", action="store_true", help="compare with the in-memory reference")
    ap.add_argument("--drop-caches", action="store_true", help="cold page cache before the merge")
    args = ap.parse_args()

    ensure_family(args.preset, args.root)
    recipe = write_recipe(args.preset, args.method, args.root)
    out = args.root / f"{args.preset}-{args.method}-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = merge_cmd(recipe, out, args.max_memory)
    print("$ " + " ".join(cmd), file=sys.stderr)
    if args.drop_caches and not drop_caches():
        print("warning: could not drop the page cache", file=sys.stderr)
    result: dict[str, object] = {
        "preset": args.preset,
        "method": args.method,
        "max_memory": args.max_memory,
        **measure(cmd),
    }
    if args.verify and result["returncode"] == 0:
        checked, bad = verify(recipe, out)
        result.update(verified_tensors=checked, mismatches=bad[:10], identical=not bad)
    print(json.dumps(result))
    return 0 if result["returncode"] == 0 and not result.get("mismatches") else 1


if __name__ == "__main__":
    sys.exit(main())
