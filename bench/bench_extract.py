"""Benchmark: batched, length-grouped extraction against the official one-segment-at-a-time loop.

    python bench/bench_extract.py [--sizes tiny,medium,official] [--max_pieces N] [--bf16]

Both sides use the same weights and inputs, from two input sets:

* ``corpus``: evenly spaced music21-corpus MusicXML scores converted to interleaved ABC with this
  repository's converters (typical sheet music; cached under ``data/bench/extract_corpus/``);
* ``fixtures``: the 62 interleaved ABC and MTF pieces of the official fixtures, chosen to exercise
  segmentation (18 pieces exceed 512 patches), so little of their work is padding: a worst case
  for batching.

The official approach pads every segment to 512 patches, runs batch size 1 and embeds
patches with a one-hot matmul in eager attention; ours groups segments by length, pads each batch
to its own longest segment, gathers the patch embedding and uses fused attention.

Useful GFLOP/s counts only unpadded work (linear layers, attention scores and mixing, the
projection) with the patch embedding counted as the gather-and-add it is; efficiency compares it
with this machine's dense float32 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fileio import REPO_ROOT

if TYPE_CHECKING:  # --help answers before torch is imported; the functions import it
    import torch
    from modeling import CLaMP3Model

OFFICIAL = REPO_ROOT.parent / "shared" / "fixtures" / "official"
TINY_TEXT = {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 514, "type_vocab_size": 1,
             "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}


MAX_PADDING = 0.1


def bert(hidden: int, layers: int, heads: int, positions: int) -> dict:
    return {"vocab_size": 1, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * hidden, "max_position_embeddings": positions}


def model_for(size: str) -> CLaMP3Model:
    """Same weights for both approaches; the text and audio towers stay small (unused here)."""
    import torch
    from modeling import CLaMP3Model, ModelConfig, load_clamp3

    if size == "tiny":
        return load_clamp3(ModelConfig.from_json(OFFICIAL / "model" / "tiny_model_config.json"),
                           OFFICIAL / "model" / "tiny_clamp3.pth")
    hidden, layers = {"medium": (384, 6), "official": (768, 12)}[size]
    config = ModelConfig(symbolic=bert(hidden, layers, hidden // 64, 512), audio=bert(32, 1, 2, 128),
                         text=TINY_TEXT, projection_size=hidden)
    torch.manual_seed(0)
    return CLaMP3Model(config).eval()


def corpus_pieces(count: int) -> list[str]:
    """Interleaved ABC of ``count`` evenly spaced music21-corpus scores (converted once, cached)."""
    from bench_abc import corpus_files  # bench/ is on sys.path: it holds the script being run
    from preprocess.batch import ConversionError
    from preprocess.interleave import interleave_abc
    from preprocess.xml2abc import convert_file

    cache = REPO_ROOT / "data" / "bench" / "extract_corpus" / str(count)
    if not cache.is_dir():
        tmp = cache.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(corpus_files(count)):
            try:
                (tmp / f"{i:04d}.abc").write_text(interleave_abc(convert_file(path)), encoding="utf-8")
            except ConversionError:
                continue
        tmp.rename(cache)
    return [f.read_text(encoding="utf-8") for f in sorted(cache.glob("*.abc"))]


def fixture_pieces() -> list[str]:
    files = sorted((OFFICIAL / "outputs" / "int_abc").glob("*.abc")) + \
        sorted((OFFICIAL / "outputs" / "int_abc_from_abc_inputs").glob("*.abc")) + \
        sorted((OFFICIAL / "outputs" / "mtf").glob("*.mtf"))
    return [f.read_text(encoding="utf-8") for f in files]


def useful_flops(model: CLaMP3Model, lengths: list[int]) -> float:
    cfg = model.model_config.symbolic
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    proj = model.model_config.projection_size
    total = 0.0
    for n in lengths:
        per_layer = 2 * n * (4 * h * h + 2 * h * inter) + 2 * 2 * n * n * h  # linears + QK^T and AV
        total += layers * per_layer + n * 64 * h + 2 * h * proj  # gather-add embedding, projection
    return total


def matmul_gflops(seconds: float = 3.0) -> float:
    """This machine's dense float32 matmul rate: the faster of torch.mm and oneDNN's linear kernel
    (which the batched path uses), on 2048^3 products."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    kernels = [lambda: a @ b]
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is not None and torch.backends.mkldnn.is_available():
        kernels.append(lambda: op(a, b, None, "none", [], ""))
    best = 0.0
    for kernel in kernels:
        for _ in range(3):
            kernel()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            kernel()
            count += 1
        best = max(best, 2 * 2048**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def official_loop(model: CLaMP3Model, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """The official extraction arithmetic: segment by segment, padded to 512, one-hot embedding."""
    import torch
    from features import segment_bounds, segment_weights

    encoder = model.symbolic_model
    encoder.use_one_hot = True
    outputs = []
    try:
        with torch.no_grad():
            for x in inputs:
                feats = []
                for start, end in segment_bounds(len(x), 512):
                    values = torch.zeros(1, 512, x.shape[1], dtype=torch.long)
                    mask = torch.zeros(1, 512, dtype=torch.long)
                    values[0, : end - start] = x[start:end]
                    mask[0, : end - start] = 1
                    feats.append(model.features("symbolic", values, mask, get_global=True)[0])
                w = torch.tensor(segment_weights(len(x), 512), dtype=torch.float32).unsqueeze(-1)
                outputs.append(((torch.stack(feats) * w).sum(0) / w.sum()).unsqueeze(0).numpy())
    finally:
        encoder.use_one_hot = False
    return outputs


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def best_time(run, repeats: int):
    """(fastest wall time, result) over ``repeats`` runs: this shared machine's speed varies."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_size(size: str, pieces: list[str], matmul_rate: float, bf16: bool, tokens_per_batch: int,
               repeats: int) -> dict:
    from features import FeatureExtractor, segment_bounds

    eager = model_for(size)
    fast = model_for(size)
    fast.load_state_dict(eager.state_dict())
    for module in fast.modules():  # switch the copy to fused attention
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "sdpa"
    extractor = FeatureExtractor(fast, tokens_per_batch=tokens_per_batch, max_padding=MAX_PADDING)
    inputs = [extractor.symbolic_input(p) for p in pieces]
    lengths = [e - s for x in inputs for s, e in segment_bounds(len(x), 512)]
    flops = useful_flops(fast, lengths)

    extractor.extract("symbolic", inputs[:2])  # warm-up
    ours_s, ours = best_time(lambda: extractor.extract("symbolic", inputs), repeats)
    official_s, reference = best_time(lambda: official_loop(eager, inputs), repeats)

    row = {
        "size": size, "pieces": len(inputs), "segments": len(lengths), "patches": sum(lengths),
        "official_pieces_per_s": len(inputs) / official_s, "batched_pieces_per_s": len(inputs) / ours_s,
        "padding_ratio": 512 * len(lengths) / sum(lengths), "speedup": official_s / ours_s, "useful_gflops": flops / ours_s / 1e9,
        "efficiency": flops / ours_s / 1e9 / matmul_rate,
        "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(ours, reference, strict=True))),
    }
    if bf16:
        extractor.dtype = "bfloat16"
        extractor.extract("symbolic", inputs[:2])
        bf16_s, low = best_time(lambda: extractor.extract("symbolic", inputs), repeats)
        row["bf16_speedup"] = official_s / bf16_s
        row["bf16_min_cosine"] = min(cosine(a, b) for a, b in zip(low, ours, strict=True))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,medium,official", help="comma-separated: tiny,medium,official")
    parser.add_argument("--inputs", default="corpus,fixtures", help="comma-separated: corpus,fixtures")
    parser.add_argument("--corpus_pieces", type=int, default=100, help="music21-corpus scores to convert")
    parser.add_argument("--max_pieces", type=int, default=0,
                        help="use only N evenly spaced pieces of each input set (0 = all)")
    parser.add_argument("--official_max_pieces", type=int, default=40,
                        help="pieces for the official size, whose baseline takes ~1 s per segment here")
    parser.add_argument("--tokens_per_batch", type=int, default=8192)
    parser.add_argument("--max_padding", type=float, default=0.1, help="FeatureExtractor max_padding")
    parser.add_argument("--bf16", action="store_true", help="also time the bfloat16 autocast path")
    parser.add_argument("--repeats", type=int, default=2, help="best of R runs for every timing")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help need not wait for it

    global MAX_PADDING
    MAX_PADDING = args.max_padding

    input_sets = {"corpus": lambda: corpus_pieces(args.corpus_pieces), "fixtures": fixture_pieces}
    rate = matmul_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; dense float32 matmul {rate:.1f} GFLOP/s")
    rows = []
    for input_name in args.inputs.split(","):
        pieces = input_sets[input_name]()
        for size in args.sizes.split(","):
            limit = args.official_max_pieces if size == "official" else args.max_pieces
            # an evenly spaced subset keeps short and long pieces alike
            chosen = pieces if not limit or limit >= len(pieces) else \
                [pieces[i] for i in np.linspace(0, len(pieces) - 1, limit).astype(int)]
            row = {"inputs": input_name, **bench_size(size, chosen, rate, args.bf16, args.tokens_per_batch, args.repeats)}
            rows.append(row)
            line = (f"{input_name:8s} {size:8s} pieces {row['pieces']:3d} segments {row['segments']:3d} "
                    f"padding x{row['padding_ratio']:.2f} | official {row['official_pieces_per_s']:8.2f}/s  "
                    f"batched {row['batched_pieces_per_s']:8.2f}/s  x{row['speedup']:.2f} | useful "
                    f"{row['useful_gflops']:.1f} GFLOP/s ({100 * row['efficiency']:.0f}% of matmul) | "
                    f"max|diff| {row['max_abs_diff']:.1e}")
            if args.bf16:
                line += f" | bf16 x{row['bf16_speedup']:.2f} min cos {row['bf16_min_cosine']:.5f}"
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": rate, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
