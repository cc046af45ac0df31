"""Synthetic Llama-shaped model families for tests and benchmarks: a base plus K fine-tunes.

Every model is a Hugging Face folder (``config.json``, ``generation_config.json``, sharded
safetensors and ``model.safetensors.index.json``) that ``transformers.LlamaForCausalLM`` loads.

Values. Base weights are N(0, 0.02) (norm weights 1 + N(0, 0.02)). Fine-tune k stores
``base + delta_k``, computed in float32 and rounded once to the storage dtype, where ``delta_k``
mimics a real fine-tune: Gaussian noise (std ~1e-3 times a scale that varies with layer and
model), ~0.1% Student-t spikes, and for matrices a rank-4 part.

Determinism. Each row chunk of each tensor of each model draws from its own
``torch.Generator``, seeded with a stable hash (BLAKE2b) of (seed, model index, tensor name,
first row). Chunk boundaries are a fixed function of the tensor shape (:data:`CHUNK_ELEMS`),
so any chunk can be regenerated on its own, and results do not depend on the number of
worker threads. The rank-4 factors are drawn once per (seed, model, tensor) and quantized to
multiples of 1/8 so their product is exact in float32 whatever the BLAS summation order.

Memory. Tensors are generated and written chunk by chunk (at most :data:`CHUNK_ELEMS`
elements), all models in one pass: a base chunk is computed and written, then each fine-tune's
chunk is base + delta. Peak RSS is a few chunks per worker thread (~60 MiB each), whatever the
preset.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_io import (
    FLOAT_DTYPES,
    ShardWriter,
    atomic_write_text,
    plan_shards,
    tensor_bytes,
    write_index,
)

SYNTH_VERSION = 1
"""Bumped whenever generated values change, so cached families can be told apart."""

CHUNK_ELEMS = 1 << 22
"""Target elements per generated row chunk (4 Mi elements = 16 MiB of float32).

Changing it changes the generated values, since every chunk has its own generator."""

BASE_STD = 0.02
"""Standard deviation of base weights (and of base norm weights around 1)."""

DELTA_STD = 1e-3
"""Nominal standard deviation of the Gaussian part of a fine-tune delta, before scaling."""

NORM_DELTA_FACTOR = 16.0
"""Norm-weight deltas are this much larger, so they survive rounding to bf16 next to 1.0
(bf16 spacing is 2**-8 ~ 0.004 just below 1.0 and 2**-7 above)."""

SPIKE_RATE = 1e-3
"""Fraction of elements that receive a heavy-tailed spike."""

SPIKE_SCALE = 5.0
"""Spike scale relative to the chunk's noise std (before the Student-t tail)."""

SPIKE_CLIP = 20.0
"""Spikes are clipped at this many spike scales (t with 3 dof has unbounded variance tails)."""

LOW_RANK = 4
"""Rank of the structured part of 2-D deltas."""

_HASH_DOMAIN = f"streammerge.synth/v{SYNTH_VERSION}"

_Factors = tuple[torch.Tensor, torch.Tensor]

_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """Dimensions of a Llama-architecture decoder (all sizes in elements)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    max_position_embeddings: int = 2048
    experts: int = 0
    """Mixture of experts when > 0: per layer a router and this many experts, each a gated MLP
    of ``intermediate`` (Qwen3-MoE's tensor names and per-expert layout, as on the Hub)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_specs(self, dtype: str = "BF16") -> list[tuple[str, str, tuple[int, ...]]]:
        """``(name, dtype, shape)`` for every tensor, in Hugging Face state-dict order."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        specs: list[tuple[str, str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", dtype, (self.vocab, h))
        ]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            specs += [
                (p + "self_attn.q_proj.weight", dtype, (q, h)),
                (p + "self_attn.k_proj.weight", dtype, (kv, h)),
                (p + "self_attn.v_proj.weight", dtype, (kv, h)),
                (p + "self_attn.o_proj.weight", dtype, (h, q)),
            ]
            mlps = [p + "mlp."]
            if self.experts:
                specs += [
                    (p + "self_attn.q_norm.weight", dtype, (self.head_dim,)),
                    (p + "self_attn.k_norm.weight", dtype, (self.head_dim,)),
                    (p + "mlp.gate.weight", dtype, (self.experts, h)),
                ]
                mlps = [f"{p}mlp.experts.{e}." for e in range(self.experts)]
            for m in mlps:
                specs += [
                    (m + "gate_proj.weight", dtype, (i, h)),
                    (m + "up_proj.weight", dtype, (i, h)),
                    (m + "down_proj.weight", dtype, (h, i)),
                ]
            specs += [
                (p + "input_layernorm.weight", dtype, (h,)),
                (p + "post_attention_layernorm.weight", dtype, (h,)),
            ]
        specs.append(("model.norm.weight", dtype, (h,)))
        if not self.tie_embeddings:
            specs.append(("lm_head.weight", dtype, (self.vocab, h)))
        return specs

    def num_params(self) -> int:
        """Total parameter count (elements over all tensors)."""
        total = 0
        for _, _, shape in self.tensor_specs():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


PRESETS: dict[str, LlamaShape] = {
    # Odd sizes on purpose: they exercise chunk tails and unaligned shapes.
    "tiny": LlamaShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256),
    # TinyLlama-1.1B
    "1b": LlamaShape(
        hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000
    ),
    # Llama-3.2-3B (tied embeddings: no lm_head tensor)
    "3b": LlamaShape(
        hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256,
        tie_embeddings=True, rope_theta=500_000.0, bos_token_id=128000, eos_token_id=128001,
    ),
    # Qwen3-MoE-like: 16 layers x 64 experts, 3,219 tensors, most of 16 Ki elements (what
    # per-tensor overhead is measured on)
    "moe": LlamaShape(
        hidden=256, intermediate=64, layers=16, heads=4, kv_heads=2, vocab=8000, experts=64,
    ),
    # Llama-3-8B
    "8b": LlamaShape(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
        rope_theta=500_000.0, bos_token_id=128000, eos_token_id=128001,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Deterministic randomness


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' string forms; stable across runs (unlike ``hash()``)."""
    key = "/".join([_HASH_DOMAIN, *(str(p) for p in parts)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def _unit(*parts: object) -> float:
    """A deterministic pseudo-random number in [0, 1)."""
    return stable_seed(*parts) / 2.0**63


def _layer_of(name: str) -> int | None:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def delta_std(shape: LlamaShape, name: str, model: int, seed: int) -> float:
    """Std of the Gaussian part of fine-tune ``model``'s delta for tensor ``name``.

    Varies with the model (one factor in [0.7, 1.4]), with depth (rising from 0.6 to 1.4
    across layers, with per-layer jitter in [0.7, 1.4]) and with the tensor kind (norm
    weights larger, see :data:`NORM_DELTA_FACTOR`; embeddings and head smaller).
    """
    model_factor = 2.0 ** (_unit(seed, model, "model-scale") - 0.5)
    layer = _layer_of(name)
    # Embeddings, final norm and head move less than the blocks; deeper blocks move more.
    depth = 0.5 if layer is None else 0.6 + 0.8 * layer / max(1, shape.layers - 1)
    jitter = 2.0 ** (_unit(seed, model, "layer-scale", layer) - 0.5)
    kind = NORM_DELTA_FACTOR if name.endswith("norm.weight") else 1.0
    return DELTA_STD * model_factor * depth * jitter * kind


def _low_rank_factors(name: str, rows: int, cols: int, model: int, seed: int) -> _Factors:
    """Rank-4 factors ``U (rows, 4)`` and ``V (4, cols)``, entries ~N(0, 1) in steps of 1/8.

    The quantization makes every product and 4-term sum exact in float32 (|entries| < 2**7,
    so partial sums are multiples of 1/64 far below 2**24/64), so ``U @ V`` is bit-identical
    whatever BLAS, thread count or summation order computes it. ``U @ V`` has std ~2.
    """
    g = _generator(seed, model, name, "low-rank")
    u = torch.randn(rows, LOW_RANK, generator=g).mul_(8).round_().div_(8)
    v = torch.randn(LOW_RANK, cols, generator=g).mul_(8).round_().div_(8)
    return u, v


def _rows_per_chunk(shape: tuple[int, ...]) -> int:
    if len(shape) == 1:
        return max(1, CHUNK_ELEMS)
    return max(1, CHUNK_ELEMS // shape[1])


def _base_chunk(name: str, shape: tuple[int, ...], r0: int, r1: int, seed: int) -> torch.Tensor:
    """Float32 base values of rows ``[r0, r1)``, flattened."""
    n = (r1 - r0) * (shape[1] if len(shape) == 2 else 1)
    mean = 1.0 if len(shape) == 1 else 0.0  # RMSNorm gains sit around 1
    g = _generator(seed, 0, name, r0)
    return torch.empty(n).normal_(mean, BASE_STD, generator=g)


def _delta_chunk(
    shape_cfg: LlamaShape,
    name: str,
    shape: tuple[int, ...],
    r0: int,
    r1: int,
    model: int,
    seed: int,
    factors: _Factors | None,
) -> torch.Tensor:
    """Float32 delta of fine-tune ``model`` (>= 1) for rows ``[r0, r1)``, flattened."""
    cols = shape[1] if len(shape) == 2 else 1
    n = (r1 - r0) * cols
    std = delta_std(shape_cfg, name, model, seed)
    g = _generator(seed, model, name, r0)
    delta = torch.empty(n).normal_(0.0, std, generator=g)
    k = int(n * SPIKE_RATE)
    if k:
        # Unique indices: with duplicates, "delta[idx] += v" would pick a winner arbitrarily.
        idx = torch.randint(0, n, (k,), generator=g).unique()
        z = torch.randn(4, idx.numel(), generator=g)
        t = z[0] / z[1:].square().mean(0).sqrt()  # Student-t, 3 degrees of freedom
        t.clamp_(-SPIKE_CLIP, SPIKE_CLIP).mul_(SPIKE_SCALE * std)
        delta[idx] += t
    if factors is not None:
        u, v = factors
        lr = torch.mm(u[r0:r1], v)  # exact, see _low_rank_factors
        # Separate mul and add (no alpha=) so no fused multiply-add path can change rounding.
        lr.mul_(std / 2.0)
        delta.add_(lr.view(-1))
    return delta


def synth_tensor(
    preset: str | LlamaShape, name: str, model: int = 0, seed: int = 0
) -> torch.Tensor:
    """The float32 values of one whole tensor of model ``model`` (0 = base), before rounding.

    Meant for tests on small presets: stored values are ``synth_tensor(...).to(dtype)``.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    shapes = {n: s for n, _, s in cfg.tensor_specs()}
    shape = shapes[name]
    factors = None
    if model and len(shape) == 2:
        factors = _low_rank_factors(name, shape[0], shape[1], model, seed)
    step = _rows_per_chunk(shape)
    parts = []
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        x = _base_chunk(name, shape, r0, r1, seed)
        if model:
            x += _delta_chunk(cfg, name, shape, r0, r1, model, seed, factors)
        parts.append(x)
    return torch.cat(parts).view(shape)


# --------------------------------------------------------------------------------------------
# Writing


def _config(cfg: LlamaShape, dtype: str) -> dict[str, object]:
    if cfg.experts:
        return {
            **_llama_config(cfg, dtype),
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": cfg.intermediate,
            "num_experts": cfg.experts,
            "num_experts_per_tok": min(8, cfg.experts),
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return _llama_config(cfg, dtype)


def _llama_config(cfg: LlamaShape, dtype: str) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden,
        "initializer_range": BASE_STD,
        "intermediate_size": cfg.intermediate,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": cfg.heads,
        "num_hidden_layers": cfg.layers,
        "num_key_value_heads": cfg.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
        "vocab_size": cfg.vocab,
    }


def _clear_model_dir(path: Path) -> None:
    """Remove weights a previous run left, so a different shard count cannot leave strays."""
    path.mkdir(parents=True, exist_ok=True)
    for pattern in ("model-*.safetensors", "model-*.safetensors.partial", "model.safetensors"):
        for p in path.glob(pattern):
            p.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)


def generate_family(
    out_dir: Path,
    preset: str | LlamaShape = "tiny",
    n_finetunes: int = 2,
    seed: int = 0,
    dtype: str = "BF16",
    shard_size: int = 2_000_000_000,
    *,
    verbose: bool = False,
    workers: int | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``out_dir/base`` and ``out_dir/ft1`` .. ``ftK``; return ``(base, [fts])``.

    ``dtype`` is the safetensors storage dtype (``"BF16"``, ``"F16"`` or ``"F32"``);
    ``shard_size`` is the largest shard in bytes (a bigger tensor gets a shard of its own).
    ``workers`` threads generate chunks in parallel (default: up to 2, the CPU count); output
    is identical for any value. With ``verbose``, one progress line per layer goes to stderr.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, not {dtype!r}")
    if n_finetunes < 0:
        raise ValueError("n_finetunes must be >= 0")
    torch_dtype = FLOAT_DTYPES[dtype]
    out_dir = Path(out_dir)
    dirs = [out_dir / "base"] + [out_dir / f"ft{k}" for k in range(1, n_finetunes + 1)]
    specs = cfg.tensor_specs(dtype)
    plan = plan_shards(specs, shard_size)
    shard_of = {t.name: i for i, s in enumerate(plan) for t in s.tensors}

    config_text = json.dumps(_config(cfg, dtype), indent=2) + "\n"
    gen_text = json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2
    )
    writers: list[list[ShardWriter]] = []
    for d in dirs:
        _clear_model_dir(d)
        atomic_write_text(d / "config.json", config_text)
        atomic_write_text(d / "generation_config.json", gen_text + "\n")
        writers.append([ShardWriter(d, s) for s in plan])

    def job(
        name: str, shape: tuple[int, ...], r0: int, r1: int, factors: list[_Factors | None]
    ) -> None:
        # Runs in a worker thread; torch kernels release the GIL, so workers overlap.
        cols = shape[1] if len(shape) == 2 else 1
        start = r0 * cols
        base = _base_chunk(name, shape, r0, r1, seed)
        writers[0][shard_of[name]].write(name, start, tensor_bytes(base.to(torch_dtype)))
        for m in range(1, len(dirs)):
            x = _delta_chunk(cfg, name, shape, r0, r1, m, seed, factors[m])
            x.add_(base)
            writers[m][shard_of[name]].write(name, start, tensor_bytes(x.to(torch_dtype)))

    n_workers = workers or min(2, os.cpu_count() or 1)
    old_threads = torch.get_num_threads()
    if n_workers > 1:
        torch.set_num_threads(1)  # parallelism comes from workers; avoid oversubscription
    t0 = time.perf_counter()
    pending: deque[tuple[Future[None], Callable[[], None] | None]] = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            fut, on_done = pending.popleft()
            fut.result()
            if on_done is not None:
                on_done()

    def progress(label: str) -> Callable[[], None] | None:
        if not verbose:
            return None
        return lambda: print(
            f"[synth] {label} done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr
        )

    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="synth")
    try:
        for i, (name, _, shape) in enumerate(specs):
            factors: list[_Factors | None] = [None] * len(dirs)
            if len(shape) == 2:
                for m in range(1, len(dirs)):
                    factors[m] = _low_rank_factors(name, shape[0], shape[1], m, seed)
            nxt = specs[i + 1][0] if i + 1 < len(specs) else ""
            layer = _layer_of(name)
            group_ends = layer is None or _layer_of(nxt) != layer
            step = _rows_per_chunk(shape)
            for r0 in range(0, shape[0], step):
                r1 = min(shape[0], r0 + step)
                last = group_ends and r1 == shape[0]
                label = name if layer is None else f"layer {layer + 1}/{cfg.layers}"
                fut = pool.submit(job, name, shape, r0, r1, factors)
                pending.append((fut, progress(label) if last else None))
                # Bound the chunks in flight (and so memory) to two per worker.
                drain(2 * n_workers)
        drain(0)
        for ws in writers:
            for w in ws:
                w.finish()
    except BaseException:
        # Stop queued chunks (running ones finish) before closing their files.
        pool.shutdown(wait=True, cancel_futures=True)
        for ws in writers:
            for w in ws:
                w.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(old_threads)
    for d in dirs:
        write_index(d, plan, {})
    return dirs[0], dirs[1:]
