"""Tokenizers, chat templates and vocabulary remapping (mergekit's ``tokenizer_source``,
``tokenizer:`` and ``chat_template``).

Three parts, in the order a merge uses them:

- :func:`parse_tokenizer` validates the recipe's keys into a frozen :class:`TokenizerConfig`
  (before any input is opened);
- :func:`plan_vocab` decides, from the inputs' tokenizers and headers only, how every model's
  embedding and ``lm_head`` rows map onto the output vocabulary (a :class:`VocabMap`: per
  model, a source row or a fill rule for every output row) and builds the output tokenizer;
- :class:`RemappedFolder` wraps a model folder so that the scheduler, the planner and every
  method see the remapped tensor, built chunk by chunk (:func:`gather_rows`, a pure function of
  row reads, shared with the in-memory reference) while the tensor streams.

The fill rules are mergekit 0.1.5's (``mergekit/tokenizer/embed.py``): a token every model has
keeps each model's own row; a token some model lacks gets, in that model, the row of the one
model that has it, else the base's, else the mean of the models that have it, else zeros;
``tokens:`` entries override this (``force`` applies the rule to every model), and rows padded
by ``pad_to_multiple_of`` get the mean of the model's own (remapped) token rows. Without a
tokenizer source, embeddings of different row counts keep their common leading rows (mergekit's
``--unsafe-truncate-embeddings``; mergekit refuses by default), and only when the base's
tokenizer fits in them.

``transformers`` is needed only to build a tokenizer (``tokenizer_source``/``tokenizer:``); it
is an optional dependency (``pip install 'streammerge[tokenizer]'``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError, RecipeError
from .safetensors_io import FLOAT_DTYPES, TensorInfo, atomic_write_text, tensor_bytes

if TYPE_CHECKING:
    from .model import ModelFolder
    from .recipe import Recipe

BUILTIN_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
"""``chat_template:`` names with a template shipped in ``streammerge/chat_templates``."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
"""Tokenizer files of the base that a built tokenizer replaces in the output."""
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|tok_embeddings|lm_head)"
    r"\.(weight|bias)$|^output\.weight$"
)
"""Token-indexed tensors (vocabulary on axis 0): input embeddings and output heads."""
MEAN_BLOCK_ELEMS = 1 << 20
"""Elements per block of the padded rows' mean (fixed, so any chunking gives the same sum)."""


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a ``tokens:`` entry's embedding comes from."""

    kind: str
    """``zero``, ``model`` (the model's row for the same token) or ``model_token``."""
    model: int | None = None
    """Input index (0: the base, k: the recipe's k-th model) for ``model``/``model_token``."""
    token: str | None = None
    token_id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("zero", "model", "model_token"):
            raise RecipeError(f"token source kind must be zero or model_token, got {self.kind!r}")
        if self.kind == "model_token" and (self.token is None) == (self.token_id is None):
            raise RecipeError("a model_token source needs exactly one of 'token' or 'token_id'")


@dataclass(frozen=True, slots=True)
class TokenRule:
    """One ``tokenizer.tokens`` entry: the token is added to the output vocabulary."""

    token: str
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """The recipe's tokenizer keys; ``source`` None means: copy the base's tokenizer."""

    source: str | int | None = None
    """``"union"``, ``"base"``, an input index, or None (no tokenizer is built)."""
    tokens: tuple[TokenRule, ...] = ()
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    """``auto``, a built-in name, or Jinja text (as written)."""

    def __post_init__(self) -> None:
        if isinstance(self.source, str) and self.source not in ("union", "base"):
            raise RecipeError(f"tokenizer source must be union, base or a model: {self.source}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise RecipeError("tokenizer.pad_to_multiple_of must be a positive integer")
        if self.source is None and (self.tokens or self.pad_to_multiple_of):
            raise RecipeError("tokenizer.tokens and pad_to_multiple_of need a tokenizer source")


def parse_tokenizer(
    doc: Mapping[str, Any], model_index: Callable[[Any, str], int]
) -> TokenizerConfig | None:
    """The recipe's ``tokenizer_source`` / ``tokenizer`` / ``chat_template`` keys, validated.

    ``model_index(ref, where)`` resolves a model reference to its input index (0: base) or
    raises :class:`RecipeError`. None when the recipe uses none of the keys.
    """
    legacy, section, template = (doc.get(k) for k in ("tokenizer_source", "tokenizer",
                                                      "chat_template"))  # fmt: skip
    if legacy is None and section is None and template is None:
        return None
    if legacy is not None and section is not None:
        raise RecipeError("give either 'tokenizer_source' or 'tokenizer:', not both (as mergekit)")

    def source(value: Any, where: str) -> str | int:
        if value in ("union", "base"):
            return value
        return model_index(value, where)

    src: str | int | None = None
    tokens: list[TokenRule] = []
    pad = None
    if legacy is not None:
        src = source(legacy, "tokenizer_source")
    elif section is not None:
        if not isinstance(section, dict):
            raise RecipeError("'tokenizer' must be a mapping (source, tokens, pad_to_multiple_of)")
        extra = sorted(set(section) - {"source", "tokens", "pad_to_multiple_of"})
        if extra:
            raise RecipeError(f"tokenizer: unknown keys {', '.join(map(str, extra))}")
        src = source(section.get("source", "union"), "tokenizer.source")  # mergekit's default
        pad = section.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise RecipeError(f"tokenizer.pad_to_multiple_of must be a positive integer: {pad!r}")
        raw = section.get("tokens") or {}
        if not isinstance(raw, dict):
            raise RecipeError("tokenizer.tokens must map each token to {source, force}")
        tokens = [_token_rule(tok, cfg, model_index) for tok, cfg in raw.items()]
    if template is not None:
        _check_template(template)
    return TokenizerConfig(src, tuple(tokens), pad, template)


def _token_rule(tok: Any, cfg: Any, model_index: Callable[[Any, str], int]) -> TokenRule:
    where = f"tokenizer.tokens[{tok!r}]"
    if not isinstance(tok, str) or not tok:
        raise RecipeError(f"{where}: a token must be a non-empty string")
    cfg = cfg or {}
    if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
        raise RecipeError(f"{where} must be a mapping with 'source' and/or 'force'")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force must be true or false")
    raw = cfg.get("source")
    src = None
    if isinstance(raw, dict) and "kind" in raw:
        kind = raw["kind"]
        if kind == "zero":
            src = TokenSource("zero")
        elif kind == "model_token":
            extra = set(raw) - {"kind", "model", "token", "token_id"}
            if extra or "model" not in raw:
                raise RecipeError(f"{where}.source: model_token needs model and token/token_id")
            tid = raw.get("token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise RecipeError(f"{where}.source.token_id must be a non-negative integer")
            token = raw.get("token")
            if token is not None and not isinstance(token, str):
                raise RecipeError(f"{where}.source.token must be a string")
            src = TokenSource("model_token", model_index(raw["model"], f"{where}.source.model"),
                              token, tid)  # fmt: skip
        else:
            raise RecipeError(f"{where}.source.kind must be zero or model_token, got {kind!r}")
    elif raw is not None:
        src = TokenSource("model", model_index(raw, f"{where}.source"))
    return TokenRule(tok, src, force)


def _check_template(value: Any) -> None:
    """mergekit's rule: ``auto``, a built-in name, or Jinja (has ``{``, at least 20 chars)."""
    if not isinstance(value, str):
        raise RecipeError(f"chat_template must be a string, got {value!r}")
    if value == "auto" or value in BUILTIN_TEMPLATES:
        return
    if len(value) < 20 or "{" not in value:
        raise RecipeError(
            f"chat_template {value!r} is neither auto, a built-in name "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template"
        )


def builtin_template(name: str) -> str:
    """The text of a built-in chat template."""
    return resources.files(__package__).joinpath(f"chat_templates/{name}.jinja").read_text()


def folder_chat_template(path: Path) -> str | None:
    """A model folder's chat template as transformers reads it: ``chat_template.jinja`` first,
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or the ``default`` of a list)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict)
                  and x.get("name") == "default"), None)  # fmt: skip
    return t if isinstance(t, str) else None


def resolve_template(value: str | None, folders: Sequence[Path]) -> str | None:
    """The chat template text to write: ``auto`` is the most common template among the inputs
    (None when none has one), a built-in name its shipped text, anything else as written."""
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for p in folders if (t := folder_chat_template(p))]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN_TEMPLATES:
        return builtin_template(value)
    return value


# --- the vocabulary map -------------------------------------------------------------------

Fill = tuple[tuple[int, int], ...]
"""A filled row: the mean of these (input index, source row) rows; () is a zero row."""
PAD = -2
"""Source-row code of a padding row (the mean of the model's own token rows)."""
FILL = -1
"""Source-row code of a row given by the map's ``fills``."""


@dataclass(frozen=True, eq=False)
class VocabMap:
    """How every input's token-indexed tensors map onto the output's rows.

    ``src[k][r]``: the row of input k (0: base) that output row r copies, or FILL (the row is
    ``fills[r]``, the same for every input) or PAD. Rows ``>= tokens`` are padding.
    """

    rows: int
    """Output rows (the output vocabulary, padded)."""
    tokens: int
    """Output tokens (rows below this are tokens)."""
    src: tuple[torch.Tensor, ...]
    fills: Mapping[int, Fill]
    names: frozenset[str]
    """The remapped tensors."""
    tokenizer: Any = None
    """The output tokenizer (transformers), or None when the base's files are copied."""
    warnings: tuple[str, ...] = ()

    def digest(self) -> str:
        """SHA-256 of the mapping (what the remapped bytes depend on), for the plan digest."""
        h = hashlib.sha256(f"{self.rows},{self.tokens},{sorted(self.names)}".encode())
        for s in self.src:
            h.update(s.numpy().tobytes())
        h.update(repr(sorted(self.fills.items())).encode())
        return h.hexdigest()


RowReader = Callable[[int, int, int], torch.Tensor]
"""``read(k, a, b)``: rows ``[a, b)`` of input k's tensor as a ``(b - a, width)`` tensor."""


def gather_rows(
    vmap: VocabMap,
    k: int,
    r0: int,
    r1: int,
    read: RowReader,
    dtype: torch.dtype,
    width: int,
    pad_mean: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Output rows ``[r0, r1)`` of input k's remapped tensor, in ``dtype``.

    Runs of consecutive source rows are read in one piece; filled rows are the float64 mean
    of their source rows rounded once to ``dtype``; padding rows are ``pad_mean()``.
    """
    out = torch.empty((r1 - r0, width), dtype=dtype)
    src = vmap.src[k][r0:r1]
    own = torch.nonzero(src >= 0).flatten()
    if own.numel():
        rows = src[own]
        # a run breaks where either the output or the source row does not advance by one
        breaks = torch.nonzero((torch.diff(own) != 1) | (torch.diff(rows) != 1)).flatten() + 1
        bounds = [0, *breaks.tolist(), own.numel()]
        for a, b in itertools.pairwise(bounds):
            o, s = int(own[a]), int(rows[a])
            out[o : o + b - a] = read(k, s, s + b - a)
    for i in torch.nonzero(src == FILL).flatten().tolist():
        parts = vmap.fills[r0 + i]
        acc = torch.zeros(width, dtype=torch.float64)
        for j, row in parts:
            acc += read(j, row, row + 1)[0].to(torch.float64)
        out[i] = acc / max(1, len(parts))
    pads = torch.nonzero(src == PAD).flatten()
    if pads.numel():
        assert pad_mean is not None
        out[pads] = pad_mean()
    return out


def token_mean(
    vmap: VocabMap, rows: Callable[[int, int], torch.Tensor], dtype: torch.dtype, width: int
) -> torch.Tensor:
    """The mean of a model's remapped token rows (what its padding rows get), from ``rows(a,
    b)`` (its remapped rows ``[a, b)``, ``b <= vmap.tokens``), summed in float64 over fixed
    blocks of rows so the result does not depend on how the caller chunks."""
    block = max(1, MEAN_BLOCK_ELEMS // max(1, width))
    acc = torch.zeros(width, dtype=torch.float64)
    for a in range(0, vmap.tokens, block):
        acc += rows(a, min(vmap.tokens, a + block)).sum(dim=0, dtype=torch.float64)
    return (acc / vmap.tokens).to(dtype)


def remap_full(vmap: VocabMap, k: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """In-memory reference: input k's whole remapped tensor from every input's whole tensor."""
    width = tensors[0][0].numel()

    def read(j: int, a: int, b: int) -> torch.Tensor:
        return tensors[j].reshape(tensors[j].shape[0], -1)[a:b]

    dtype = tensors[k].dtype

    def mean() -> torch.Tensor:
        return token_mean(
            vmap, lambda a, b: gather_rows(vmap, k, a, b, read, dtype, width), dtype, width
        )

    rows = gather_rows(vmap, k, 0, vmap.rows, read, dtype, width, mean)
    return rows.reshape(vmap.rows, *tensors[k].shape[1:])


# --- building the map ---------------------------------------------------------------------


def vocab_tensors(base: ModelFolder) -> list[str]:
    """The base's token-indexed float tensors (by name)."""
    return [n for n in base.names() if VOCAB_TENSOR.search(n) and base.info(n).is_float
            and len(base.info(n).shape) >= 1]  # fmt: skip


def plan_vocab(recipe: Recipe, base: ModelFolder, models: Sequence[ModelFolder]) -> VocabMap | None:
    """The vocabulary map of this merge, or None when every input's rows already line up and
    no tokenizer is built. Reads tokenizer files and headers only."""
    cfg = recipe.tokenizer
    folders = [base, *models]
    names = vocab_tensors(base)
    for name in names:
        width = base.info(name).shape[1:]
        for f in models:
            if name in f.where and f.info(name).shape[1:] != width:
                raise InputError(
                    f"{f.file_of(name)}: tensor {name!r} has shape {list(f.info(name).shape)}, "
                    f"base has {list(base.info(name).shape)} (only the row count may differ)"
                )
    rows = [_rows(f, names) for f in folders]
    if cfg is None or cfg.source is None:
        return _truncation(recipe, folders, names, rows)
    if not names:  # a tokenizer whose rows we cannot find would not fit the model
        raise InputError(
            f"{base.path}: no token-indexed tensor (embed_tokens, lm_head, wte, ...) to remap "
            "onto the built tokenizer; remove tokenizer_source / tokenizer:"
        )
    return _build(recipe, cfg, folders, names, rows)


def _rows(folder: ModelFolder, names: Sequence[str]) -> int | None:
    """A folder's vocabulary rows: the fewest rows among its token-indexed tensors."""
    counts = [folder.info(n).shape[0] for n in names if n in folder.where]
    return min(counts) if counts else None


def _truncation(
    recipe: Recipe, folders: Sequence[ModelFolder], names: list[str], rows: list[int | None]
) -> VocabMap | None:
    """Without a tokenizer source: keep the common leading rows, as mergekit's
    ``--unsafe-truncate-embeddings`` does, when the base's tokenizer fits in them."""
    sizes = {folders[k].info(n).shape[0] for k in range(len(folders)) for n in names
             if n in folders[k].where}  # fmt: skip
    if len(sizes) <= 1:
        return None
    keep = min(sizes)
    base_rows = max(folders[0].info(n).shape[0] for n in names)
    big = next(n for n in names if folders[0].info(n).shape[0] == base_rows)
    if base_rows > keep:
        small = next(f for f in folders if _rows(f, names) == keep)
        raise InputError(
            f"{small.path}: tensor {big!r} has {keep} rows, base {folders[0].path} has "
            f"{base_rows}: keeping the common {keep} rows would cut the base's tokenizer. Set "
            "'tokenizer_source: base' (or union) to remap rows by token"
        )
    warning = (
        f"token-indexed tensors ({', '.join(names)}) have {sorted(sizes)} rows: kept the "
        f"base's {keep} rows of every model, assuming all models agree on those token ids "
        "(set 'tokenizer_source' to match rows by token instead)"
    )
    src = tuple(torch.arange(keep, dtype=torch.int64) for _ in folders)
    return VocabMap(keep, keep, src, {}, frozenset(names), None, (warning,))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RecipeError(
            "tokenizer_source / tokenizer: need the transformers library to build the output "
            "tokenizer: pip install 'streammerge[tokenizer]'"
        ) from None
    transformers.logging.set_verbosity_error()  # its notices are not ours to print
    return transformers


def _has_tokenizer(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _load_tokenizer(tf: Any, path: Path) -> Any:
    try:
        return tf.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # transformers raises many kinds; name the folder, keep one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: cannot load its tokenizer: {msg}") from None


def _config_vocab(path: Path) -> int | None:
    try:
        v = json.loads((path / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _build(
    recipe: Recipe,
    cfg: TokenizerConfig,
    folders: Sequence[ModelFolder],
    names: list[str],
    rows: list[int | None],
) -> VocabMap:
    tf = _transformers()
    warnings: list[str] = []
    if not _has_tokenizer(folders[0].path):
        raise InputError(f"{folders[0].path}: the base has no tokenizer files to build from")
    toks: list[Any] = []
    for k, f in enumerate(folders):
        if k and not _has_tokenizer(f.path):
            warnings.append(f"{f.path}: no tokenizer files; assumed to be the base's")
            toks.append(toks[0])
        else:
            toks.append(_load_tokenizer(tf, f.path))
    # ids at or past a model's vocab size have no row (mergekit: config vocab_size)
    sizes = []
    for k, f in enumerate(folders):
        limit = [x for x in (_config_vocab(f.path), rows[k]) if x is not None]
        sizes.append(min(limit) if limit else len(toks[k]))
    if isinstance(cfg.source, int):
        out_tok = _load_tokenizer(tf, folders[cfg.source].path)
    elif cfg.source == "base":
        out_tok = _load_tokenizer(tf, folders[0].path)  # a fresh copy: we add tokens to it
    else:
        out_tok = _union(tf, folders[0].path, toks, sizes)
    have = set(out_tok.get_vocab())
    for rule in cfg.tokens:
        if rule.token not in have:
            out_tok.add_tokens(rule.token)
            have.add(rule.token)
    vocab = out_tok.get_vocab()
    n = len(vocab)
    if any(i >= n or i < 0 for i in vocab.values()):
        raise InputError(f"{folders[0].path}: the output tokenizer's ids are not 0..{n - 1}")
    pad = cfg.pad_to_multiple_of
    total = -(-n // pad) * pad if pad else n
    # present[k][t]: input k's row for output token t, -1 if it lacks it
    present = torch.full((len(folders), n), -1, dtype=torch.int64)
    vocabs = [t.get_vocab() for t in toks]
    for k, v in enumerate(vocabs):
        idx = [(t, v[tok]) for tok, t in vocab.items() if tok in v and v[tok] < sizes[k]]
        if idx:
            tt = torch.tensor(idx, dtype=torch.int64)
            present[k, tt[:, 0]] = tt[:, 1]
    fills, forced = _fills(cfg, vocab, present, vocabs, sizes, folders, warnings)
    src = []
    for k in range(len(folders)):
        s = torch.full((total,), PAD, dtype=torch.int64)
        s[:n] = torch.where(present[k] >= 0, present[k], FILL)
        if forced:
            s[torch.tensor(sorted(forced), dtype=torch.int64)] = FILL
        missing = [t for t in torch.nonzero(s[:n] == FILL).flatten().tolist() if t not in fills]
        if missing:
            tok = next(tok for tok, t in vocab.items() if t == missing[0])
            raise RecipeError(
                f"tokenizer.tokens[{tok!r}]: {folders[k].path} lacks the token and the entry "
                "gives no source for it"
            )
        src.append(s)
    return VocabMap(total, n, tuple(src), fills, frozenset(names), out_tok, tuple(warnings))


def _union(tf: Any, base_path: Path, toks: Sequence[Any], sizes: Sequence[int]) -> Any:
    """mergekit's union: the base's tokenizer plus every other input's tokens (ordinary ones
    first, in input order, then added tokens with their first-seen settings)."""
    out = _load_tokenizer(tf, base_path)
    base_vocab = set(out.get_vocab())
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for k, tok in enumerate(toks):
        decoder = tok.added_tokens_decoder
        names = {a.content for a in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1]):
            if i < sizes[k] and t not in names:
                plain.setdefault(t, None)
        for i, info in sorted(decoder.items()):
            if i < sizes[k]:
                added.setdefault(info.content, info)
    new = [t for t in plain if t not in added and t not in base_vocab]
    if new:
        out.add_tokens(new)
    for info in added.values():
        out.add_tokens(info)
    return out


def _fills(
    cfg: TokenizerConfig,
    vocab: Mapping[str, int],
    present: torch.Tensor,
    vocabs: Sequence[Mapping[str, int]],
    sizes: Sequence[int],
    folders: Sequence[ModelFolder],
    warnings: list[str],
) -> tuple[dict[int, Fill], set[int]]:
    """The fill of every output token some input lacks (or that ``force`` sets everywhere)."""
    rules = {r.token: r for r in cfg.tokens}
    has = present >= 0
    need = torch.nonzero(~has.all(dim=0)).flatten().tolist()
    forced = {vocab[r.token] for r in cfg.tokens if r.force}
    by_id = {t: tok for tok, t in vocab.items()}
    fills: dict[int, Fill] = {}
    nowhere = []
    for t in sorted(set(need) | forced):
        tok = by_id[t]
        rule = rules.get(tok)
        where = torch.nonzero(has[:, t]).flatten().tolist()
        if rule is not None:
            if rule.source is None:
                continue  # nothing to fill from: refused per model if a model needs it
            fills[t] = _explicit(rule, t, present, vocabs, sizes, folders)
        elif len(where) == 1:
            fills[t] = ((where[0], int(present[where[0], t])),)
        elif not where:
            fills[t] = ()
            nowhere.append(tok)
        elif 0 in where:
            fills[t] = ((0, int(present[0, t])),)
        else:
            fills[t] = tuple((j, int(present[j, t])) for j in where)
    if nowhere:
        shown = ", ".join(map(repr, nowhere[:5])) + (" ..." if len(nowhere) > 5 else "")
        warnings.append(f"{len(nowhere)} tokens in no model, given zero rows: {shown}")
    return fills, forced


def _explicit(
    rule: TokenRule,
    t: int,
    present: torch.Tensor,
    vocabs: Sequence[Mapping[str, int]],
    sizes: Sequence[int],
    folders: Sequence[ModelFolder],
) -> Fill:
    src = rule.source
    assert src is not None
    where = f"tokenizer.tokens[{rule.token!r}]"
    if src.kind == "zero":
        return ()
    j = src.model
    assert j is not None
    if src.kind == "model":
        row = int(present[j, t])
        if row < 0:
            raise RecipeError(f"{where}: {folders[j].path} has no token {rule.token!r}")
        return ((j, row),)
    if src.token_id is not None:
        row = src.token_id
    else:
        if src.token not in vocabs[j]:
            raise RecipeError(f"{where}: {folders[j].path} has no token {src.token!r}")
        row = vocabs[j][src.token]  # type: ignore[index]
    if row >= sizes[j]:
        raise RecipeError(f"{where}: token id {row} is past {folders[j].path}'s {sizes[j]} rows")
    return ((j, row),)


# --- streaming ----------------------------------------------------------------------------


class RemappedFolder:
    """A model folder whose token-indexed tensors read as remapped onto the output vocabulary.

    Everything else is the wrapped folder's. A remapped chunk is built (a copy, the size of the
    chunk) from runs of the source rows, whose mapped pages are released at once.
    """

    def __init__(
        self, folder: ModelFolder, k: int, vmap: VocabMap, inputs: Sequence[ModelFolder]
    ) -> None:
        self._folder, self._k, self._vmap, self._inputs = folder, k, vmap, inputs
        self._means: dict[str, torch.Tensor] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._folder, attr)

    def info(self, name: str) -> TensorInfo:
        info = self._folder.info(name)
        if name not in self._vmap.names:
            return info
        shape = (self._vmap.rows, *info.shape[1:])
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name, info.dtype, shape, 0, n * info.itemsize)

    def _gather(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Output rows ``[r0, r1)``: copied out of the mapped source rows, whose pages are
        released once copied (the chunk's own source rows are mapped at most once)."""
        info = self._folder.info(name)
        dtype, width = FLOAT_DTYPES[info.dtype], info.numel // info.shape[0]
        mapped: list[tuple[ModelFolder, int, int]] = []

        def read(j: int, a: int, b: int) -> torch.Tensor:
            f = self._inputs[j]
            w = f.info(name).numel // f.info(name).shape[0]
            mapped.append((f, a * w, b * w))
            return f.read(name, a * w, b * w).reshape(b - a, w)

        def mean() -> torch.Tensor:
            if name not in self._means:
                self._means[name] = token_mean(
                    self._vmap, lambda a, b: self._gather(name, a, b), dtype, width
                )
            return self._means[name]

        try:
            return gather_rows(self._vmap, self._k, r0, r1, read, dtype, width, mean)
        finally:
            for f, a, b in mapped:
                f.release(name, a, b)

    def _direct(self, name: str, start: int, end: int) -> tuple[int, int] | None:
        """The source element range of output elements ``[start, end)`` when they are one run
        of consecutive source rows (the usual case: read as a zero-copy view), else None."""
        width = self._folder.info(name).numel // self._folder.info(name).shape[0]
        r0, r1 = start // width, -(-end // width)
        src = self._vmap.src[self._k][r0:r1]
        first = int(src[0])
        if first < 0 or not torch.equal(src, torch.arange(first, first + r1 - r0)):
            return None
        a = first * width + start - r0 * width
        return a, a + end - start

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        if name not in self._vmap.names:
            return self._folder.read(name, start, end)
        direct = self._direct(name, start, end)
        if direct is not None:
            return self._folder.read(name, *direct)
        width = self.info(name).numel // self.info(name).shape[0]
        r0, r1 = start // width, -(-end // width)
        rows = self._gather(name, r0, r1).reshape(-1)
        return rows[start - r0 * width : end - r0 * width]

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        if name not in self._vmap.names:
            return self._folder.read_bytes(name, start, end)
        data = tensor_bytes(self.read(name, start, end).contiguous())
        self.release(name, start, end)
        return data

    def release(self, name: str, start: int, end: int) -> None:
        if name not in self._vmap.names:
            self._folder.release(name, start, end)
        elif (direct := self._direct(name, start, end)) is not None:
            self._folder.release(name, *direct)
        # (a gathered chunk released its source pages as it copied them)

    def preload(self, name: str, start: int, end: int, buf: bytearray) -> None:
        if name not in self._vmap.names:
            self._folder.preload(name, start, end, buf)
            return
        width = self.info(name).numel // self.info(name).shape[0]
        src = self._vmap.src[self._k][start // width : -(-end // width)]
        own = src[src >= 0]
        if own.numel() and int(own.max() - own.min()) < 2 * own.numel():  # roughly a run
            a, b = int(own.min()), int(own.max()) + 1
            self._folder.preload(name, a * width, b * width, buf)


def remapped(
    vmap: VocabMap | None, base: ModelFolder, models: Sequence[ModelFolder]
) -> tuple[ModelFolder, list[ModelFolder]]:
    """The inputs as the merge must see them: wrapped when a vocabulary map applies."""
    if vmap is None:
        return base, list(models)
    inputs = [base, *models]
    wrapped = [RemappedFolder(f, k, vmap, inputs) for k, f in enumerate(inputs)]
    return wrapped[0], wrapped[1:]  # type: ignore[return-value]


# --- the output's files -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenizerOutput:
    """What finalize writes: the built tokenizer, the chat template, config's vocab_size."""

    vmap: VocabMap | None
    template: str | None
    warnings: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line for ``plan``: the output vocabulary, what is remapped, the chat template."""
        parts = []
        v = self.vmap
        if v is not None:
            what = "built tokenizer" if v.tokenizer is not None else "the base's tokenizer"
            pad = f" ({v.rows - v.tokens} padding)" if v.rows > v.tokens else ""
            parts.append(f"{what}, {v.tokens:,} tokens, {v.rows:,} rows{pad}; rows remapped in "
                         f"{', '.join(sorted(v.names))}")  # fmt: skip
        if self.template is not None:
            parts.append(f"chat template set ({len(self.template)} characters)")
        return "; ".join(parts) or "the base's tokenizer"

    def write(self, out_dir: Path) -> None:
        """Called after the base's files were copied into ``out_dir``, before the marker."""
        tok = self.vmap.tokenizer if self.vmap is not None else None
        if tok is not None:
            for name in TOKENIZER_FILES:  # stale copies of the base's would shadow ours
                (out_dir / name).unlink(missing_ok=True)
            if self.template is not None:
                tok.chat_template = self.template
            tok.save_pretrained(str(out_dir))
            _set_config_vocab(out_dir, self.vmap.rows)  # type: ignore[union-attr]
        elif self.template is not None:
            write_template(out_dir, self.template)


def write_template(out_dir: Path, template: str) -> None:
    """Where every transformers version reads it: ``chat_template.jinja`` (preferred by recent
    ones) and ``tokenizer_config.json``'s ``chat_template`` (older ones)."""
    atomic_write_text(out_dir / "chat_template.jinja", template)
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = template
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _set_config_vocab(out_dir: Path, rows: int) -> None:
    path = out_dir / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    cfg["vocab_size"] = rows
    atomic_write_text(path, json.dumps(cfg, indent=2) + "\n")


def prepare(
    recipe: Recipe, base: ModelFolder, models: Sequence[ModelFolder]
) -> tuple[ModelFolder, list[ModelFolder], TokenizerOutput | None]:
    """Decide the vocabulary map and the output tokenizer before any tensor data is read; the
    inputs come back wrapped when rows are remapped. None: nothing to do."""
    vmap = plan_vocab(recipe, base, models)
    cfg = recipe.tokenizer
    value = cfg.chat_template if cfg is not None else None
    template = resolve_template(value, [base.path, *(m.path for m in models)])
    warnings = list(vmap.warnings) if vmap is not None else []
    if value is not None and template is None:
        warnings.append("chat_template: auto found no chat template in the inputs; none set")
    copied = vmap is None or vmap.tokenizer is None
    if template is not None and copied and not _has_tokenizer(base.path):
        warnings.append(f"{base.path} has no tokenizer: the chat template is not written")
        template = None
    b, ms = remapped(vmap, base, models)
    if vmap is None and template is None and not warnings:
        return b, ms, None
    return b, ms, TokenizerOutput(vmap, template, tuple(warnings))


def vocab_digest(out: TokenizerOutput | None) -> str | None:
    """What the plan digest records of the vocabulary map (None: rows pass through)."""
    return None if out is None or out.vmap is None else out.vmap.digest()
