"""Compare streammerge's LoRA inputs with PEFT's ``merge_and_unload`` on a toy model.

PEFT is never a streammerge dependency: run this with a Python that has ``peft`` (and
``transformers``, for GPT-2's Conv1D), e.g. a throwaway venv:
``python -m venv /tmp/peft-venv && /tmp/peft-venv/bin/pip install torch==2.13.0 peft`` and
``PYTHONPATH=. /tmp/peft-venv/bin/python bench/lora_vs_peft.py``. Exits 0 with a message when
PEFT is missing.

A toy module (embedding, two Linear layers, a Conv1D, a LayerNorm, a head kept whole with
``modules_to_save``) gets a random PEFT adapter (``init_lora_weights=False``, rank and alpha
patterns, with and without rslora; ``fan_in_fan_out`` for the Conv1D), saved by PEFT itself;
every tensor read through :class:`streammerge.lora.AdaptedFolder` is compared with PEFT's
merged weights and with a float64 evaluation. Exit 1 when a tensor is farther from the
float64 value than PEFT's plus 2 ulps of its dtype, or a tensor PEFT changed is unchanged.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from streammerge.lora import AdaptedFolder


def main() -> int:
    try:
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        print("peft (and transformers) not installed: nothing compared")
        return 0

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(37, 24)
            self.q_proj = nn.Linear(24, 24, bias=False)
            self.up_proj = nn.Linear(24, 50, bias=False)
            self.c_attn = Conv1D(30, 24)
            self.norm = nn.LayerNorm(24)
            self.lm_head = nn.Linear(24, 37, bias=True)

    bad = 0
    root = Path(tempfile.mkdtemp(prefix="lora-vs-peft-"))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for rslora in (False, True):
                for fifo in (False, True):
                    torch.manual_seed(0)
                    model = Toy().to(dtype)
                    base = {
                        k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                    }
                    shutil.rmtree(root / "base", ignore_errors=True)
                    (root / "base").mkdir()
                    save_file(base, root / "base/model.safetensors")
                    (root / "base/config.json").write_text("{}")
                    targets = ["c_attn"] if fifo else ["embed_tokens", "q_proj", "up_proj"]
                    cfg = LoraConfig(
                        r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora,
                        rank_pattern={"up_proj": 2}, alpha_pattern={"q_proj": 3},
                        init_lora_weights=False, fan_in_fan_out=fifo,
                        modules_to_save=None if fifo else ["lm_head"],
                    )  # fmt: skip
                    peft_model = get_peft_model(model, cfg)
                    with torch.no_grad():
                        for p in peft_model.parameters():
                            if p.requires_grad and p.dim() == 1:
                                p.add_(0.5)  # the kept-whole head's bias differs from the base
                    shutil.rmtree(root / "adapter", ignore_errors=True)
                    peft_model.save_pretrained(root / "adapter")
                    merged = peft_model.merge_and_unload().state_dict()
                    folder = AdaptedFolder(root / "base", root / "adapter")
                    for name, w in base.items():
                        got = folder.read(name, 0, w.numel()).reshape(w.shape)
                        want = merged[name]
                        diff = (got.double() - want.double()).abs().max().item()
                        ulp = torch.finfo(dtype).eps * want.double().abs().max().item()
                        changed = not torch.equal(want, w)
                        ok = diff <= 2 * ulp and (torch.equal(got, w) != changed)
                        bad += not ok
                        print(f"{dtype!s:15} rslora={rslora!s:5} fifo={fifo!s:5} {name:20} "
                              f"{'equal' if torch.equal(got, want) else f'max diff {diff:.3g}'}"
                              f"{'' if ok else '  <-- MISMATCH'}")  # fmt: skip
                    folder.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("all tensors agree" if not bad else f"{bad} tensors disagree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
