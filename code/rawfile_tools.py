"""What the raw-file scripts share beyond one file's features: folders mirrored as ``.npy``
(``embed_folder``, its manifest and the feature folders in the cache), the options every raw-file
script takes (``add_model_arguments``, ``open_embedder``), and the two-folder tools (``clamp3_eval.py``,
``clamp3_score.py``), which embed both folders into the cache and run ``inference/<tool>.py`` on the
feature folders as its own process, as the official raw-file wrappers do (so their numbers are the
official tool's).

Every raw-file script builds its parser from this module before it parses, so ``--help`` must not
load torch: the model side (``embedder``, ``extraction``) is imported by the functions that run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileio import (
    REPO_ROOT,
    DropLog,
    atomic_save_npy,
    atomic_write_text,
    failure_log_path,
    repo_path,
    with_extension,
)
from rawfiles import ABC_MODES, KIND_OF_EXTENSION, RawFileError, discover
from tqdm import tqdm

if TYPE_CHECKING:
    from embedder import Embedder


# ---------------------------------------------------------------------------- the rule for every tool
# One rule for the raw-file tools' inputs and exit status: a folder that is missing, or holds no
# file the tools read, is an error naming that folder (exit 2); a folder none of whose files could
# be used is an error too (exit 2); otherwise every failed file is named and logged and the rest go
# on (exit 0), or, with --strict, the tool finishes and exits 1 when any file failed.
EXIT_SOME_FAILED = 1
EXIT_UNUSABLE = 2


def folder_inputs(folder: str | os.PathLike, role: str) -> list[Path]:
    """The files of ``folder`` the raw-file tools look at (``discover``); ``FileNotFoundError``
    naming the folder when it is missing or holds none (``role``: "input", "query", "folder"...)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{role} folder not found: {folder}")
    files = discover(folder)
    if not files:
        known = " ".join(sorted(KIND_OF_EXTENSION))
        raise FileNotFoundError(f"no file the raw-file tools read in the {role} folder {folder} "
                                f"(searched recursively for {known})")
    return files


def exit_status(role: str, folder: str | os.PathLike, total: int, failed: int, strict: bool,
                log: str | os.PathLike | None = None) -> int:
    """The exit status of a tool that read ``total`` files of ``folder``, ``failed`` of them in vain;
    the error is printed when it is not 0."""
    where = f"; see {log}" if log else ""
    if total and failed >= total:
        print(f"error: none of the {total} files in the {role} folder {folder} could be used{where}", file=sys.stderr)
        return EXIT_UNUSABLE
    if strict and failed:
        print(f"error: {failed} of {total} files in the {role} folder {folder} failed (--strict){where}",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def remove_orphaned_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files an atomic write left in ``folder`` (and beside it, for the manifest)
    when its process was killed: ``.<name>.<random>.tmp``. One tool per output folder at a time."""
    folder = Path(folder)
    removed = 0
    candidates = list(folder.rglob(".*.tmp")) if folder.is_dir() else []
    candidates += list(folder.parent.glob(f".{folder.name}.embd_manifest.json.*.tmp"))
    for path in candidates:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------------------- folders
@dataclass
class FolderSummary:
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        """The input files this run looked at (removed outputs are not inputs)."""
        return self.written + self.unchanged + self.failed

    def line(self) -> str:
        return (f"{self.written} written, {self.unchanged} unchanged, {self.removed} removed (their inputs are "
                f"gone), {self.failed} failed")


def manifest_path(output_dir: str | os.PathLike) -> Path:
    """Beside the feature folder, as the extraction config is: the folder itself holds only ``.npy``."""
    folder = Path(os.path.abspath(output_dir))
    return folder.with_name(folder.name + ".embd_manifest.json")


def _folder_plan(input_dir: Path, output_dir: Path) -> tuple[dict, list[Path], list[tuple[Path, str, Path]], list[int]]:
    """(previous manifest outputs, inputs in order, name clashes, inputs' bytes) of an ``embed_folder`` run."""
    manifest_file = manifest_path(output_dir)
    try:
        previous = json.loads(manifest_file.read_text(encoding="utf-8"))["outputs"] if manifest_file.is_file() else {}
    except (OSError, ValueError, KeyError):
        previous = {}
    claimed: dict[str, Path] = {}
    inputs: list[Path] = []
    clashes: list[tuple[Path, str, Path]] = []
    sizes: list[int] = []
    for rel in discover(input_dir):
        out_rel = with_extension(rel, ".npy").as_posix()
        if out_rel in claimed:
            clashes.append((rel, out_rel, claimed[out_rel]))
            continue
        claimed[out_rel] = rel
        inputs.append(rel)
        try:
            sizes.append((input_dir / rel).stat().st_size)
        except OSError:
            sizes.append(0)  # reading it fails later, and is logged then
    return previous, inputs, clashes, sizes


def embed_folder(embedder: Embedder, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 get_global: bool, drops: DropLog | None = None,
                 progress: Callable[[int], None] | None = None,
                 planned: Callable[[int], None] | None = None) -> FolderSummary:
    """One ``.npy`` per input file at the mirrored path under ``output_dir`` (``name.ext`` →
    ``name.npy``), written only when missing or when the input or model changed; outputs this tool
    wrote for inputs that are gone are deleted. The manifest beside the folder records what each
    output was made from. ``planned`` is told how many files this process embeds (a bar's total).

    With a process group (``clamp3_embd.py`` under torchrun), rank 0 plans the run (the previous
    manifest, the inputs, the name clashes), each rank embeds and writes whole chunks of
    ``EXTRACT_FILES_PER_CHUNK`` inputs (``extraction.split_chunks``, balanced by bytes; each input
    on exactly one rank), and once every rank is done rank 0 deletes stale outputs and writes the
    manifest; every rank returns the summary of all. Every rank must call it. Without a process
    group, one rank takes every chunk in order, as it always did."""
    # Imported here, as torch comes with it: see the module docstring.
    from extraction import RankShare, chunk_ranges, chunk_weights, split_chunks

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    share = RankShare()
    try:
        def plan() -> tuple:
            remove_orphaned_temporaries(output_dir)  # a killed run's half-written outputs
            return _folder_plan(input_dir, output_dir)

        previous, inputs, clashes, sizes = share.from_main(plan)
        summary = FolderSummary()
        if share.is_main:
            for rel, out_rel, other in clashes:
                summary.failed += 1
                if drops is not None:
                    drops.fail(input_dir / rel, "name", f"its output {out_rel} is already made from {other}")
        batch_files = int(embedder.cfg["EXTRACT_FILES_PER_CHUNK"])
        spans = chunk_ranges(len(inputs), batch_files)
        assigned = split_chunks(chunk_weights(sizes, batch_files), share.world_size)[share.rank]
        if planned is not None:
            planned(sum(len(spans[index]) for index in assigned))
        before = embedder.summary.failed
        mine: dict[str, dict[str, Any]] = {}
        for index in assigned:
            chunk = [inputs[i] for i in spans[index]]
            results = embedder.embed_files([input_dir / rel for rel in chunk], get_global=get_global, drops=drops,
                                           progress=progress, batch_files=batch_files)
            for rel, result in zip(chunk, results, strict=True):
                if isinstance(result, RawFileError):
                    continue
                out_rel = with_extension(rel, ".npy").as_posix()
                record = {"input": rel.as_posix(), "sha256": result.sha256, "kind": result.kind,
                          "format": result.format, "model_key": result.model_key, "get_global": get_global,
                          "adapter": str(embedder.adapter_of(result.format) or "") or None}
                target = output_dir / out_rel
                if previous.get(out_rel) == record and target.is_file():
                    summary.unchanged += 1
                else:
                    atomic_save_npy(target, result.feature)
                    summary.written += 1
                mine[out_rel] = record
        summary.failed += embedder.summary.failed - before
        everyone = share.gather((mine, summary))
    finally:
        share.close()
    total = FolderSummary()
    done: dict[str, dict[str, Any]] = {}
    for records, part in everyone:
        done.update(records)
        total.written += part.written
        total.unchanged += part.unchanged
        total.failed += part.failed
    # The manifest lists outputs in input order, whichever rank made them.
    outputs = {out_rel: done[out_rel] for out_rel in (with_extension(rel, ".npy").as_posix() for rel in inputs)
               if out_rel in done}

    def finish() -> int:
        removed = 0
        # Inputs that are gone, and inputs that failed this time: an old feature of either is stale.
        for out_rel in sorted(set(previous) - set(outputs)):
            stale = output_dir / out_rel
            if stale.is_file():
                stale.unlink()
                removed += 1
        document = {"input_dir": str(input_dir.resolve()), "get_global": get_global,
                    "models": embedder.choice.describe(), "outputs": outputs}
        atomic_write_text(manifest_path(output_dir), json.dumps(document, indent=1) + "\n")
        return removed

    total.removed = share.from_main(finish)
    return total


def folder_cache_dir(cache_dir: str | os.PathLike, input_dir: str | os.PathLike, get_global: bool) -> Path:
    """Where the raw-file tools keep the feature folder of an input folder (one per folder and level)."""
    resolved = Path(os.path.abspath(input_dir))
    digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:12]
    level = "global" if get_global else "patches"
    return Path(cache_dir) / "folders" / f"{resolved.name or 'root'}-{digest}-{level}"


def embed_to_cache(embedder: Embedder, input_dir: str | os.PathLike, drops: DropLog | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[Path, FolderSummary]:
    """The global-feature folder of ``input_dir`` in the cache (made or brought up to date), for the
    tools that hand feature folders to ``inference/``."""
    if embedder.cache_dir is None:
        raise ValueError("embed_to_cache needs an Embedder with a cache_dir")
    folder = folder_cache_dir(embedder.cache_dir, input_dir, get_global=True)
    return folder, embed_folder(embedder, input_dir, folder, get_global=True, drops=drops, progress=progress)


# ---------------------------------------------------------------------------- the scripts' shared options
def add_model_arguments(parser: Any, tool: str) -> None:
    """The options every raw-file tool shares (models, adapters, conversion, cache, and the failure
    log ``logs/<tool>_failures.jsonl``)."""
    parser.add_argument("--error_log", default=str(failure_log_path(tool)),
                        help="JSONL log of files that failed (default: %(default)s)")
    parser.add_argument("--weights", help="CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH; without it, the "
                        "embedded default's models when `make demo` has built them)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--no_adapter", action="store_true",
                        help="the base model for every format (default: the ABC adapter for sheet music, the MTF "
                        "adapter for MIDI, where LORA_ABC_ADAPTER_DIR / LORA_MTF_ADAPTER_DIR hold one)")
    parser.add_argument("--abc_mode", choices=ABC_MODES, default="auto",
                        help="how .abc files are read: auto (interleaved ABC as it is, plain ABC normalised and "
                        "interleaved), as_is, interleave (no normalisation), normalise (default: %(default)s)")
    parser.add_argument("--cache_dir", help="conversions and features cache (default: RAWFILE_CACHE_DIR)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no model summary")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any file failed (default: failures are named and logged, exit 0 unless "
                        "no file could be used)")


def open_embedder(args: Any, cfg: dict[str, Any], show: bool | None = None,
                  device: str | None = None) -> Embedder | None:
    """``embedder_from_args`` for a script: the models it will use printed (``show``, default: unless
    ``--quiet``), or the error printed and None (the script exits 2). ``device`` overrides
    EXTRACT_DEVICE (a launched process's own GPU)."""
    try:
        embedder = embedder_from_args(args, cfg, device=device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if (not args.quiet) if show is None else show:
        print("\n".join(embedder.choice.describe()), flush=True)
    return embedder


def embedder_from_args(args: Any, cfg: dict[str, Any], device: str | None = None) -> Embedder:
    """The ``Embedder`` the options ask for; raises ``ModelsNotFoundError``/``ValueError`` with the fix."""
    # Imported here, as torch comes with them: see the module docstring.
    from embedder import Embedder, choose_models
    from features import check_dtype

    check_dtype(cfg["EXTRACT_DTYPE"])
    choice = choose_models(cfg, weights=args.weights, model_config=args.model_config, no_adapter=args.no_adapter)
    cache_dir = Path(args.cache_dir) if args.cache_dir else repo_path(choice.cfg["RAWFILE_CACHE_DIR"])
    return Embedder(choice, cache_dir=cache_dir, abc_mode=args.abc_mode, device=device)


# ---------------------------------------------------------------------------- the two-folder tools
def run_feature_tool(tool: str, arguments: Sequence[str], quiet: bool = False) -> int:
    """Run ``inference/<tool>.py`` (the feature-folder tool) on ``arguments`` as its own process, as the
    official raw-file wrappers do; the command is printed so it can be re-run on the cached folders."""
    command = [sys.executable, str(REPO_ROOT / "inference" / f"{tool}.py"), *arguments]
    if not quiet:
        print("$ python " + " ".join(command[1:]), flush=True)
    return subprocess.run(command, check=False).returncode


def run_on_two_folders(tool: str, args: Any, cfg: dict[str, Any], tool_arguments: Sequence[str]) -> int:
    """The raw-file ``clamp3_eval.py`` / ``clamp3_score.py``: both folders embedded into the cache, then
    ``inference/<tool>.py`` on the two feature folders with ``tool_arguments``."""
    embedder = open_embedder(args, cfg)
    if embedder is None:
        return 2
    try:
        (queries, query_summary), (references, reference_summary) = embed_query_and_reference(
            embedder, tool, args.query_dir, args.reference_dir, args.error_log, args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    folders = (("query", args.query_dir, query_summary), ("reference", args.reference_dir, reference_summary))

    def statuses(strict: bool) -> list[int]:
        return [exit_status(role, folder, summary.total, summary.failed, strict, args.error_log)
                for role, folder, summary in folders]

    if EXIT_UNUSABLE in statuses(strict=False):
        return EXIT_UNUSABLE
    code = run_feature_tool(tool, [str(queries), str(references), *tool_arguments], quiet=args.quiet)
    return max(statuses(strict=True)) if code == 0 and args.strict else code


def embed_query_and_reference(embedder: Embedder, tool: str, query_dir: str, reference_dir: str,
                              error_log: str | None, quiet: bool
                              ) -> tuple[tuple[Path, FolderSummary], tuple[Path, FolderSummary]]:
    """Both folders embedded into the cache (global features), failures named and logged: each
    folder's feature folder and summary. A missing or empty folder raises ``FileNotFoundError``
    naming it (not the cache folder it would have become)."""

    def echo(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    folders = []
    inputs = {name: folder_inputs(folder, name) for name, folder in (("query", query_dir), ("reference", reference_dir))}
    # The weights, and the tokenizer when either folder holds text, before anything is embedded.
    embedder.check_models(text=any(rel.suffix.lower() == ".txt" for files in inputs.values() for rel in files))
    with DropLog(tool, error_log, echo=echo) as drops:
        for name, folder in (("query", query_dir), ("reference", reference_dir)):
            total = len(inputs[name])
            with tqdm(total=total, desc=f"embed {name}", unit="file", disable=quiet, dynamic_ncols=True) as bar:
                features, summary = embed_to_cache(embedder, folder, drops=drops, progress=bar.update)
            if not quiet:
                print(f"{name}: {total} files in {folder}: {summary.line()}; features in {features}", flush=True)
            folders.append((features, summary))
    return folders[0], folders[1]
