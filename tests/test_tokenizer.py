"""Tokenizers, chat templates and vocabulary remapping: mergekit's ``tokenizer_source``,
``tokenizer:`` and ``chat_template``, embeddings of different row counts.

The family: a base with a 256-token WordLevel tokenizer and a fine-tune that added two tokens
(258 rows), tiny Llamas built from a config so that outputs can be loaded and run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from streammerge import parse_recipe, run_merge
from streammerge.errors import InputError, RecipeError, StreamMergeError
from streammerge.reference import reference_merge

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HIDDEN = 16
WORDS = [f"w{i}" for i in range(253)]
SPECIAL = ["<unk>", "<s>", "</s>"]
ADDED = ["<tool>", "<think>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def make_tokenizer(extra: list[str] = (), words=WORDS) -> transformers.PreTrainedTokenizerFast:
    """A 256-token WordLevel tokenizer (3 specials + 253 words), plus ``extra`` added tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if extra:
        fast.add_tokens(list(extra))
    return fast


def llama(vocab: int, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path, Path]:
    """base (256 rows), ft (258 rows: two added tokens), ft2 (256 rows, base's tokenizer)."""
    root = tmp_path_factory.mktemp("tokfam")
    base = llama(256, 0)
    base_tok = make_tokenizer()
    save(base, base_tok, root / "base")
    ft = llama(258, 1)
    sd = base.state_dict()
    with torch.no_grad():
        for n, p in ft.named_parameters():
            q = sd[n]
            p[: q.shape[0]] = q + 0.02 * torch.randn(q.shape)
    save(ft, make_tokenizer(ADDED), root / "ft")
    ft2 = llama(256, 2)
    with torch.no_grad():
        for n, p in ft2.named_parameters():
            p.copy_(sd[n] + 0.02 * torch.randn(p.shape))
    save(ft2, None, root / "ft2")  # no tokenizer files: taken to be the base's
    return root / "base", root / "ft", root / "ft2"


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def recipe(base, models, method="task_arithmetic", weights=None, **top):
    weights = weights or [1.0] * len(models)
    return parse_recipe({
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}}
                   for m, w in zip(models, weights, strict=True)],
        **top,
    })  # fmt: skip


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_base_source_drops_added_rows(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], weights=[0.5], tokenizer_source="base")
    run_merge(r, tmp_path / "out", max_memory=2**32)
    got, b, f = load(tmp_path / "out"), load(base), load(ft)
    for name in VOCAB_TENSORS:
        assert got[name].shape == (256, HIDDEN)
        # every base token is in the fine-tune at the same id: task arithmetic row by row
        want = b[name] + 0.5 * (f[name][:256] - b[name])
        torch.testing.assert_close(got[name], want)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == 256
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == 256


def test_union_keeps_added_tokens_and_runs(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], weights=[0.5], tokenizer_source="union")
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=100)
    out = tmp_path / "out"
    got, b, f = load(out), load(base), load(ft)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ft_tok = transformers.AutoTokenizer.from_pretrained(ft)
    assert len(tok) == 258
    for name in VOCAB_TENSORS:
        assert got[name].shape == (258, HIDDEN)
        torch.testing.assert_close(got[name][:256], b[name] + 0.5 * (f[name][:256] - b[name]))
        for t in ADDED:
            # the base lacks the token: it takes the only model that has it, so its task
            # vector there is zero and the merged row is the fine-tune's
            assert torch.equal(got[name][tok.convert_tokens_to_ids(t)],
                               f[name][ft_tok.convert_tokens_to_ids(t)])  # fmt: skip
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 258
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("w1 w2 <tool> w3 <think>", return_tensors="pt")["input_ids"]
    assert ids.max() >= 256
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 258) and torch.isfinite(logits).all()


def test_model_source_and_ft_without_tokenizer(family, tmp_path):
    base, ft, ft2 = family
    r = recipe(base, [ft, ft2], weights=[1.0, 1.0], tokenizer_source=str(ft))
    summary = run_merge(r, tmp_path / "out", max_memory=2**32)
    assert any("no tokenizer files" in w for w in summary.warnings)
    got, b, f, f2 = load(tmp_path / "out"), load(base), load(ft), load(ft2)
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == 258
    name = "model.embed_tokens.weight"
    want = b[name] + (f[name][:256] - b[name]) + (f2[name] - b[name])
    torch.testing.assert_close(got[name][:256], want)
    # rows 256/257: only ft has them, so base and ft2 take ft's row; the merge is ft's row
    torch.testing.assert_close(got[name][256:], f[name][256:])


def test_pad_to_multiple_of_fills_with_each_models_mean(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], weights=[0.5], tokenizer={"source": "union", "pad_to_multiple_of": 64})
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=1000)
    got, b, f = load(tmp_path / "out"), load(base), load(ft)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 320
    for name in VOCAB_TENSORS:
        assert got[name].shape == (320, HIDDEN)
        base_rows = torch.cat([b[name], f[name][256:]])  # the base's remapped token rows
        want = base_rows.mean(0) + 0.5 * (f[name].mean(0) - base_rows.mean(0))
        for r_ in range(258, 320):
            torch.testing.assert_close(got[name][r_], want)


def test_forced_and_new_tokens(family, tmp_path):
    base, ft, _ = family
    tokens = {
        "w5": {"source": {"kind": "zero"}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(base), "token": "w7"}},
        "<tool>": {"source": str(base) if False else str(ft), "force": True},
        "<id>": {"source": {"kind": "model_token", "model": str(ft), "token_id": 9}},
    }
    r = recipe(base, [ft], weights=[0.5], tokenizer={"source": "base", "tokens": tokens})
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=77)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    got, b, f = load(tmp_path / "out"), load(base), load(ft)
    name = "model.embed_tokens.weight"
    assert len(tok) == 259  # base's 256 + <new>, <tool>, <id>
    assert torch.equal(got[name][tok.convert_tokens_to_ids("w5")], torch.zeros(HIDDEN))
    # a token no model has: every model takes the base's w7 row, so the merge is that row
    torch.testing.assert_close(got[name][tok.convert_tokens_to_ids("<new>")], b[name][10])
    torch.testing.assert_close(got[name][tok.convert_tokens_to_ids("<tool>")], f[name][256])
    torch.testing.assert_close(got[name][tok.convert_tokens_to_ids("<id>")], f[name][9])
    # an untouched token keeps task arithmetic
    i = tok.convert_tokens_to_ids("w100")
    torch.testing.assert_close(got[name][i], b[name][i] + 0.5 * (f[name][i] - b[name][i]))


@pytest.mark.parametrize(
    ("method", "chunk"),
    [("task_arithmetic", 37), ("ties", 100), ("ties", 1000), ("dare_linear", 1000),
     ("slerp", 37)],
)  # fmt: skip
def test_streamed_equals_reference(family, tmp_path, method, chunk):
    base, ft, _ = family
    top = {"tokenizer": {"source": "union", "pad_to_multiple_of": 7}, "dtype": "float32"}
    if method == "slerp":
        top["parameters"] = {"t": 0.3}
    if method in ("ties", "dare_linear"):
        top["parameters"] = {"density": 0.5}
    r = recipe(base, [ft], method=method, weights=[0.7], **top)
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=chunk)
    got = load(tmp_path / "out")
    n = 0
    for name, want, _ in reference_merge(r):
        assert torch.equal(bits(got[name]), bits(want)), name
        n += name in VOCAB_TENSORS
    assert n == 2 and got["lm_head.weight"].shape == (259, HIDDEN)


def test_vocab_mismatch_without_tokenizer_keeps_common_rows(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], weights=[0.5])
    summary = run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=50)
    assert any("kept the base's 256 rows" in w for w in summary.warnings)
    got, b, f = load(tmp_path / "out"), load(base), load(ft)
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(got[name], b[name] + 0.5 * (f[name][:256] - b[name]))
    # the base's tokenizer files are the output's
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        base / "tokenizer.json"
    ).read_bytes()


def test_vocab_mismatch_larger_base_is_refused(family, tmp_path):
    base, ft, _ = family
    r = recipe(ft, [base], weights=[0.5])
    with pytest.raises(
        InputError, match=r"tensor '.*' has 256 rows, base .* has 258.*tokenizer_source"
    ):
        run_merge(r, tmp_path / "out", max_memory=2**32)
    assert not (tmp_path / "out").exists()


class Stop(Exception):
    pass


def stop_after(n: int):
    seen = []

    def hook(report):
        seen.append(report.name)
        if len(seen) == n:
            raise Stop(report.name)

    return hook


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


def test_interrupted_remap_resumes_byte_identical(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], weights=[0.5], tokenizer={"source": "union", "pad_to_multiple_of": 8})
    run_merge(r, tmp_path / "whole", max_memory=2**32, chunk_elems=64, shard_size=4000)
    with pytest.raises(Stop):  # stopped after two tensors
        run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=64, shard_size=4000,
                  on_tensor=stop_after(2))  # fmt: skip
    assert not (tmp_path / "out" / "streammerge.json").exists()
    skipped = []
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=64, shard_size=4000,
              on_tensor=lambda t: skipped.append(t.skipped))  # fmt: skip
    assert any(skipped)  # it resumed rather than starting over
    assert shards(tmp_path / "out") == shards(tmp_path / "whole")
    assert len(shards(tmp_path / "out")) > 1


def test_changed_tokenizer_refuses_resume(family, tmp_path):
    base, ft, _ = family
    ft3 = tmp_path / "ft3"
    ft3.mkdir()
    for p in ft.iterdir():
        (ft3 / p.name).write_bytes(p.read_bytes())
    r = recipe(base, [ft3], tokenizer_source="union")
    with pytest.raises(Stop):
        run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=64,
                  on_tensor=stop_after(2))  # fmt: skip
    # the fine-tune's tokenizer swaps two words: the row mapping changes, while the weights
    # (what the inputs' fingerprints cover) and the output layout do not
    make_tokenizer(ADDED, ["w1", "w0", *WORDS[2:]]).save_pretrained(ft3)
    with pytest.raises(StreamMergeError, match=r"\(the inputs' tokenizers \(the embedding row"):
        run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=64)


def test_chat_template_builtin_with_built_tokenizer(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], tokenizer_source="union", chat_template="chatml")
    run_merge(r, tmp_path / "out", max_memory=2**32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert text == "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"


def test_builtin_templates_render_as_mergekits(family, tmp_path):
    base, _, ft2 = family
    r = recipe(base, [ft2], chat_template="llama3")
    run_merge(r, tmp_path / "out", max_memory=2**32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    msgs = [{"role": "user", "content": " hi "}]
    # mergekit 0.1.5's llama3 template, rendered: a newline after every <|eot_id|>
    want = "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
    gen = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == want
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want + gen


def test_chat_template_raw_without_tokenizer_source(family, tmp_path):
    base, _, ft2 = family
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    r = recipe(base, [ft2], chat_template=jinja)
    run_merge(r, tmp_path / "out", max_memory=2**32)
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == jinja
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == jinja
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "[user] hi\n[assistant] yo\n"


def test_chat_template_auto_picks_the_most_common(tmp_path):
    from streammerge.tokenizer import resolve_template

    a, b, c = (tmp_path / x for x in "abc")
    for p, t in ((a, "{{ one }}"), (b, "{{ two }}"), (c, "{{ two }}\n")):
        p.mkdir()
        (p / "chat_template.jinja").write_text(t)
    assert resolve_template("auto", [a, b, c]) == "{{ two }}"
    assert resolve_template("auto", [tmp_path]) is None
    assert "<|start_header_id|>" in resolve_template("llama3", [])


@pytest.mark.parametrize(
    ("top", "match"),
    [
        ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "not both"),
        ({"tokenizer_source": "./nowhere"}, "not found"),
        ({"chat_template": "chatmlx"}, "neither auto"),
        ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
        ({"tokenizer": {"tokens": {"x": {"source": {"kind": "mean"}}}}}, "zero or model_token"),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "B"}}}}},
            "token/token_id|exactly one",
        ),
        ({"tokenizer": {"sources": "union"}}, "unknown keys"),
    ],
)
def test_bad_tokenizer_keys(family, top, match):
    base, ft, _ = family
    if "tokenizer" in top and "tokens" in top["tokenizer"]:
        for cfg in top["tokenizer"]["tokens"].values():
            if cfg["source"].get("model") == "B":
                cfg["source"]["model"] = str(base)
    with pytest.raises(RecipeError, match=match):
        recipe(base, [ft], **top)


def test_tokenizer_keys_are_no_longer_ignored(family):
    base, ft, _ = family
    r = recipe(base, [ft], tokenizer_source="union", chat_template="auto")
    assert not r.warnings
    assert r.tokenizer.source == "union" and r.tokenizer.chat_template == "auto"
    r = recipe(base, [ft], tokenizer={"source": str(ft)})
    assert r.tokenizer.source == 1  # the recipe's first model


BIG_VOCAB, BIG_HIDDEN, BIG_BUDGET_MIB = 64000, 1024, 800


@pytest.mark.slow  # about 40 s alone, 100 s on a busy machine
def test_remapped_big_embedding_stays_in_budget(tmp_path):
    """A union of a 64000-token base and a fine-tune with two added tokens, padded: the 125 MiB
    (bf16) embedding and lm_head of each model are remapped as they stream, and the whole
    merge (inputs 3 x 250 MiB; a whole embedding in float32 with its temporaries would take
    1000 MiB) stays under a 700 MiB budget (the process alone needs about 400 MiB)."""
    from childproc import run_measured
    from conftest import write_model

    words = [f"t{i}" for i in range(BIG_VOCAB - len(SPECIAL))]
    g = torch.Generator().manual_seed(5)
    base_rows = None
    for k, name in enumerate(["base", "ft1", "ft2"]):
        rows = BIG_VOCAB + (2 if name == "ft1" else 0)
        tensors = {
            n: (torch.randn((rows, BIG_HIDDEN), generator=g) * 0.02).to(torch.bfloat16)
            for n in VOCAB_TENSORS
        }
        if base_rows is not None:
            for n in VOCAB_TENSORS:
                tensors[n][:BIG_VOCAB] = base_rows[n] + tensors[n][:BIG_VOCAB] * 0.1
        else:
            base_rows = tensors
        tensors["model.norm.weight"] = torch.ones(BIG_HIDDEN, dtype=torch.bfloat16) * (k + 1)
        write_model(tmp_path / name, tensors, config={"model_type": "toy", "vocab_size": rows})
        make_tokenizer(ADDED if name == "ft1" else [], words).save_pretrained(tmp_path / name)
    del base_rows, tensors
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
        f"  - model: {tmp_path / 'ft1'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'ft2'}\n    parameters: {{weight: 0.5}}\n"
        "tokenizer: {source: union, pad_to_multiple_of: 128}\n"
    )
    inputs = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    # the inputs nearly fill the budget (a fresh venv's baseline, with transformers loaded,
    # measured 514 MiB in CI: 700 MiB left too little for a chunk)
    assert inputs > 0.9 * BIG_BUDGET_MIB * 2**20
    rc, _, err, peak = run_measured(
        ["run", str(recipe), str(tmp_path / "out"), "--max-memory", f"{BIG_BUDGET_MIB}MiB",
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0, err
    assert peak < BIG_BUDGET_MIB, f"peak RSS {peak:.0f} MiB over the {BIG_BUDGET_MIB} MiB budget"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == 64128  # 64002 tokens padded to a multiple of 128
    assert BIG_VOCAB * BIG_HIDDEN * 16 > BIG_BUDGET_MIB * 2**20
    print(f"peak RSS {peak:.0f} MiB")


def test_plan_shows_the_vocabulary(family, tmp_path):
    from streammerge.planning import describe_plan

    base, ft, _ = family
    r = recipe(base, [ft], tokenizer={"source": "union", "pad_to_multiple_of": 64})
    report = describe_plan(r, tmp_path / "out", calibrate=False)
    assert report.vocabulary.startswith("built tokenizer, 258 tokens, 320 rows (62 padding)")
    lines = {t.name: t for t in report.tensors}
    assert lines["lm_head.weight"].shape == (320, HIDDEN)
    assert not (tmp_path / "out").exists()
    assert describe_plan(recipe(base, [ft]), tmp_path / "o", calibrate=False).vocabulary.startswith(
        "the base's tokenizer, 256 tokens, 256 rows"
    )


def test_excluded_vocab_tensor_is_the_bases_remapped(family, tmp_path):
    base, ft, _ = family
    r = recipe(base, [ft], tokenizer_source="union", exclude=["lm_head"])
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=50)
    got, b, f = load(tmp_path / "out"), load(base), load(ft)
    # copied from the base, remapped: the base's rows, then the added tokens' donor (ft) rows
    assert torch.equal(got["lm_head.weight"], torch.cat([b["lm_head.weight"],
                                                         f["lm_head.weight"][256:]]))  # fmt: skip


def test_without_transformers_a_clear_error(family, tmp_path, monkeypatch):
    import sys

    base, ft, _ = family
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(
        RecipeError, match=r"needs? the transformers library.*streammerge\[tokenizer\]"
    ):
        run_merge(recipe(base, [ft], tokenizer_source="union"), tmp_path / "out",
                  max_memory=2**32)  # fmt: skip
    assert not (tmp_path / "out").exists()
    # a chat template alone needs no transformers
    run_merge(recipe(base, [ft], chat_template="chatml"), tmp_path / "o2", max_memory=2**32)
    assert (tmp_path / "o2" / "chat_template.jinja").read_text().startswith("{%- for m in")


def test_cabs_with_union_then_inspect_reads_remapped_inputs(family, tmp_path):
    from streammerge.inspect import inspect_merge

    base, ft, ft2 = family
    r = recipe(base, [ft, ft2], method="cabs", tokenizer_source="union",
               parameters={"n_val": 2, "m_val": 8})  # fmt: skip
    run_merge(r, tmp_path / "out", max_memory=2**32, chunk_elems=64)
    rep = inspect_merge(tmp_path / "out")
    row = next(t for t in rep.tensors if t.name == "lm_head.weight")
    assert row.numel == 258 * HIDDEN
    assert row.overlap_independent is not None  # computed from the remapped inputs


def test_tokenizer_source_without_embeddings_is_refused(tmp_path):
    from conftest import write_model

    for name in ("base", "ft"):
        write_model(tmp_path / name, {"encoder.proj.weight": torch.randn(8, 4)})
        make_tokenizer().save_pretrained(tmp_path / name)
    r = recipe(tmp_path / "base", [tmp_path / "ft"], tokenizer_source="union")
    with pytest.raises(InputError, match="no token-indexed tensor"):
        run_merge(r, tmp_path / "out", max_memory=2**32)
