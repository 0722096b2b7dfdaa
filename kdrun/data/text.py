"""Text corpora for language models: documents, a tokenizer, blocks of ``block_size`` tokens.

A source gives documents (:func:`stdlib_docstrings`, :func:`text_files`, :func:`hf_disk`); they
are split into train/validation/test *by document* (seeded, so a document's text never lands in
two splits), tokenized, and cut into blocks. ``pack: true`` (the default) joins each split's
documents, an end-of-document token after each, and cuts the stream into full blocks: no padding,
so scoring needs no data-dependent indexing. ``pack: false`` gives each document its own blocks,
the last one padded, with a padding mask.

A dataset item is ``(input_ids, padding_mask)``; packed blocks carry an empty ``(0,)`` mask (the
task reads "no padding" from its shape, without looking at values). Tokenized splits and a
trained tokenizer are cached under ``cache_dir``, keyed by what made them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from kdrun.data import Splits
from kdrun.engine.checkpoint import load, save_atomic
from kdrun.errors import ConfigError

log = logging.getLogger(__name__)

# kdrun's own tokenizers put these first: ids 0, 1, 2.
SPECIALS = ("<pad>", "<eos>", "<mask>")
TOKENIZER_KINDS = ("bpe", "byte", "pretrained")
# Python's own tests and vendored packages are not the standard library's documentation.
_STDLIB_SKIPPED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
CACHE_VERSION = 1


@dataclass
class TextTokenizer:
    """What kdrun needs of a tokenizer: batch encoding, decoding, the vocabulary size and the
    special tokens (``mask_id`` None when there is none: such a tokenizer cannot do masked LM)."""

    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int | None
    backend: object = field(default=None, repr=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "byte":
            return [[byte + len(SPECIALS) for byte in text.encode("utf-8")] for text in texts]
        if self.kind == "bpe":
            return [encoding.ids for encoding in self.backend.encode_batch(texts)]
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "byte":
            return bytes(i - len(SPECIALS) for i in ids if i >= len(SPECIALS)).decode("utf-8", errors="replace")
        if self.kind == "bpe":
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.backend.decode(ids, skip_special_tokens=True)


@dataclass
class TextInfo:
    """What a text dataset adds to its :class:`Splits`: the tokenizer and the corpus facts
    (name, SHA-256 of the documents, documents and tokens per split) for the summary."""

    tokenizer: TextTokenizer
    corpus: dict
    block_size: int
    prompts: list[str] = field(default_factory=list)


# ---- documents ---------------------------------------------------------------------------------


def stdlib_docstrings(min_chars: int = 200, max_chars: int | None = None) -> list[str]:
    """The docstrings (modules, classes, functions) of the running Python's standard library,
    at least ``min_chars`` long, read with ``ast`` (nothing is imported or run). Every Python
    installation ships them, so the corpus needs no download; it differs between Python versions,
    which is why its SHA-256 is recorded with every run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIPPED & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are templates or not UTF-8
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= min_chars:
                    documents.append(text)
    return _cap(documents, max_chars)


def _cap(documents: list[str], max_chars: int | None) -> list[str]:
    """The documents, in a fixed pseudo-random order (by hash, so neighbours in the source do not
    cluster), up to ``max_chars`` characters in all."""
    documents = sorted(documents, key=lambda text: hashlib.sha256(text.encode()).hexdigest())
    if not max_chars:
        return documents
    kept, total = [], 0
    for text in documents:
        if total + len(text) > max_chars:
            break
        kept.append(text)
        total += len(text)
    return kept


def _paragraphs(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\r\n", "\n").split("\n\n") if part.strip()]


def text_files(paths: list[str] | str, text_key: str = "text", min_chars: int = 1, max_chars: int | None = None) -> list[str]:
    """Documents from files: a ``.jsonl`` file gives one document per line (its ``text_key``
    field); any other file is read as UTF-8 text, one document per paragraph (blank-line separated)."""
    documents: list[str] = []
    for given in [paths] if isinstance(paths, str) else list(paths):
        path = Path(os.path.expanduser(str(given)))
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    documents.append(str(record[text_key]))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ConfigError(f"dataset.source.paths: {path} line {number} is not a JSON object with a "
                                      f"{text_key!r} field ({err}); set dataset.source.text_key") from err
        else:
            documents.extend(_paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    return _cap([d for d in documents if len(d) >= min_chars], max_chars)


def hf_disk(path: str, text_key: str = "text", split: str | None = None, min_chars: int = 1,
            max_chars: int | None = None) -> list[str]:
    """Documents from a Hugging Face ``datasets`` dataset saved with ``save_to_disk``: the
    ``text_key`` column of ``split`` (every split of a DatasetDict when None)."""
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(os.path.expanduser(path))
    except FileNotFoundError as err:
        raise ConfigError(f"dataset.source.path={path} is not a dataset saved with save_to_disk ({err})") from err
    parts = [loaded[split]] if split else list(loaded.values()) if isinstance(loaded, DatasetDict) else [loaded]
    documents = []
    for part in parts:
        if text_key not in part.column_names:
            raise ConfigError(f"dataset.source.text_key={text_key!r} is not a column of {path} "
                              f"(columns: {', '.join(part.column_names)})")
        documents.extend(str(text) for text in part[text_key])
    return _cap([d for d in documents if len(d) >= min_chars], max_chars)


# ---- tokenizers --------------------------------------------------------------------------------


def train_bpe(documents: list[str], vocab_size: int):
    """A byte-level BPE (the ``tokenizers`` library) trained on ``documents``, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def pretrained_tokenizer(path: str) -> TextTokenizer:
    """A tokenizer saved with ``save_pretrained`` in a local directory (never downloaded)."""
    from transformers import AutoTokenizer

    directory = Path(os.path.expanduser(path))
    if not directory.is_dir():
        raise ConfigError(f"dataset.tokenizer.path={path} is not a directory (a tokenizer saved with save_pretrained)")
    try:
        backend = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"dataset.tokenizer.path={path}: no tokenizer can be loaded from it ({str(err).splitlines()[0]})") from err
    eos = backend.eos_token_id if backend.eos_token_id is not None else backend.sep_token_id
    pad = backend.pad_token_id if backend.pad_token_id is not None else eos
    if eos is None:
        raise ConfigError(f"dataset.tokenizer.path={path}: the tokenizer has no end-of-text (eos or sep) token")
    return TextTokenizer("pretrained", len(backend), pad, eos, backend.mask_token_id, backend)


def make_tokenizer(spec: dict, documents: list[str], entry: Path) -> TextTokenizer:
    """The tokenizer ``spec`` asks for; a BPE is trained on ``documents`` (the training split)
    once and kept in ``entry``."""
    kind = spec.get("kind", "bpe")
    if kind == "byte":
        return TextTokenizer("byte", 256 + len(SPECIALS), 0, 1, 2)
    if kind == "pretrained":
        return pretrained_tokenizer(str(spec.get("path")))
    from tokenizers import Tokenizer

    saved = entry / "tokenizer.json"
    if saved.exists():
        backend = Tokenizer.from_file(str(saved))
    else:
        backend = train_bpe(documents, int(spec.get("vocab_size", 1024)))
        entry.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name(f".tokenizer.{os.getpid()}.json")
        backend.save(str(tmp))
        os.replace(tmp, saved)
    return TextTokenizer("bpe", backend.get_vocab_size(), 0, 1, 2, backend)


# ---- splits and blocks -------------------------------------------------------------------------


def split_documents(documents: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(len(documents) * test_fraction), round(len(documents) * val_fraction)
    picked = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: [documents[i] for i in sorted(indices)] for name, indices in picked.items()}


def blocks(token_lists: list[list[int]], block_size: int, pack: bool, eos_id: int, pad_id: int):
    """``(ids (N, block_size), mask)``: packed full blocks (mask ``(N, 0)``), or each document's own
    blocks with the last one padded (mask ``(N, block_size)``, True at real tokens)."""
    if pack:
        stream = torch.tensor([token for tokens in token_lists for token in (*tokens, eos_id)], dtype=torch.long)
        count = len(stream) // block_size
        return stream[: count * block_size].view(count, block_size), torch.zeros(count, 0, dtype=torch.bool)
    rows, masks = [], []
    for tokens in token_lists:
        tokens = [*tokens, eos_id]
        for start in range(0, len(tokens) - 1, block_size):
            chunk = tokens[start:start + block_size]
            rows.append(chunk + [pad_id] * (block_size - len(chunk)))
            masks.append([True] * len(chunk) + [False] * (block_size - len(chunk)))
    return torch.tensor(rows, dtype=torch.long).view(-1, block_size), torch.tensor(masks, dtype=torch.bool).view(-1, block_size)


def _stat(path: str) -> list:
    path = Path(os.path.expanduser(path))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _source_identity(reader: str, options: dict) -> dict:
    """What identifies the documents without reading them: the Python (for the standard library),
    or the files' sizes and modification times."""
    if reader == "stdlib":
        return {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}
    paths = options.get("paths") or options.get("path")
    return {"files": [_stat(p) for p in ([paths] if isinstance(paths, str) else list(paths))]}


READERS = {"stdlib": stdlib_docstrings, "files": text_files, "hf_disk": hf_disk}


def corpus(cache_dir: str, reader: str = "stdlib", block_size: int = 64, tokenizer: dict | None = None,
           pack: bool = True, val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
           prompts: list[str] | None = None, **options) -> Splits:
    """A text dataset: documents from ``reader`` (``stdlib``, ``files``, ``hf_disk``; ``options``
    go to it), split by document, tokenized, cut into ``block_size`` blocks."""
    if reader not in READERS:
        raise ConfigError(f"dataset.source.reader={reader!r} must be one of {', '.join(READERS)}")
    if not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"dataset.source.block_size={block_size!r} must be an integer >= 2")
    spec = dict(tokenizer or {"kind": "bpe", "vocab_size": 1024})
    if spec.get("kind", "bpe") not in TOKENIZER_KINDS:
        raise ConfigError(f"dataset.source.tokenizer.kind={spec.get('kind')!r} must be one of {', '.join(TOKENIZER_KINDS)}")
    identity = {"version": CACHE_VERSION, "reader": reader, "options": options, "source": _source_identity(reader, options),
                "tokenizer": spec, "block_size": block_size, "pack": pack, "split": [val_fraction, test_fraction, split_seed]}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    entry = Path(os.path.expanduser(cache_dir)) / "text" / f"{reader}_{key}"
    tokens_file = entry / "tokens.pt"
    cached = load(tokens_file, "cached text dataset") if tokens_file.exists() else None
    if cached is None:
        documents = READERS[reader](**options)
        cached = _tokenize(documents, spec, entry, block_size, pack, val_fraction, test_fraction, split_seed)
        save_atomic(cached, tokens_file)
    text_tokenizer = make_tokenizer(spec, [], entry)
    _check_sizes(cached, block_size, text_tokenizer)
    info = TextInfo(text_tokenizer, {"reader": reader, **cached["facts"]}, block_size, list(prompts or []))
    log.info("Text corpus %s: sha256 %s, %s documents, %s tokens (train/val/test), %s tokenizer of %d tokens",
             reader, cached["facts"]["sha256"][:16], "/".join(map(str, cached["facts"]["documents"].values())),
             "/".join(map(str, cached["facts"]["tokens"].values())), text_tokenizer.kind, text_tokenizer.vocab_size)
    datasets = {name: TensorDataset(cached[f"{name}_ids"], cached[f"{name}_mask"]) for name in ("train", "val", "test")}
    return Splits(datasets["train"], datasets["train"], datasets["test"], text_tokenizer.vocab_size, (block_size,),
                  embedded=reader == "stdlib", in_memory=True, val=datasets["val"], text=info)


def _tokenize(documents, spec, entry, block_size, pack, val_fraction, test_fraction, split_seed) -> dict:
    if not documents:
        raise ConfigError("the text corpus is empty: no document passed dataset.source.min_chars; check the "
                          "dataset.source paths (or min_chars)")
    parts = split_documents(documents, val_fraction, test_fraction, split_seed)
    tokenizer = make_tokenizer(spec, parts["train"], entry)
    result: dict = {"facts": {"sha256": hashlib.sha256("\x00".join(documents).encode()).hexdigest(),
                              "characters": sum(map(len, documents)), "documents": {}, "tokens": {}}}
    for name in ("train", "val", "test"):
        ids, mask = blocks(tokenizer.encode(parts[name]), block_size, pack, tokenizer.eos_id, tokenizer.pad_id)
        result[f"{name}_ids"], result[f"{name}_mask"] = ids, mask
        result["facts"]["documents"][name] = len(parts[name])
        result["facts"]["tokens"][name] = int(mask.sum()) if mask.numel() else ids.numel()
    return result


def _check_sizes(cached: dict, block_size: int, tokenizer: TextTokenizer) -> None:
    for name in ("train", "val", "test"):
        if len(cached[f"{name}_ids"]) < 1:
            raise ConfigError(
                f"the text corpus is too small: its {name} split ({cached['facts']['documents'][name]} documents) gives "
                f"no block of dataset.source.block_size={block_size} tokens; add text, lower block_size or change "
                "dataset.source.val_fraction/test_fraction"
            )
    top = max(int(cached[f"{name}_ids"].max()) for name in ("train", "val", "test"))
    if top >= tokenizer.vocab_size:
        raise ConfigError(f"the cached tokens use id {top}, beyond the tokenizer's {tokenizer.vocab_size}; "
                          "delete the text cache under paths.cache/data/text")
