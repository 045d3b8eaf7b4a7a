"""Search a folder of music by text, by a piece of music or by an image's caption (the official raw-file
clamp3_search.py, with a persistent index).

    python clamp3_search.py QUERY FOLDER [--top_k K] [--json] [--format abc|mtf|audio] [--caption TEXT]
                            [--index DIR] [--no_update] [--approximate [--n_probe N]] [--no_adapter] [--weights PATH] [--model_config FILE]
                            [--abc_mode MODE] [--cache_dir DIR] [--error_log FILE] [--quiet]
                            [--config FILE] [--KEY=value ...]

QUERY is a music file (.abc, .xml/.mxl/.musicxml, .mid/.midi, .mtf, audio .wav/.mp3/.flac/.ogg, MERT
.npy: music -> music, the file itself left out), a .txt file (its text), an image (its caption: --caption, a .txt file of
the same name beside it, or the CAPTION_MODEL hook; nothing is downloaded), or else the text
itself: python clamp3_search.py "a lively jig in D major" scores/

FOLDER's music files are embedded once into a persistent index (SEARCH_INDEX_DIR/<folder>-<digest>,
or --index DIR): each later search embeds only new and changed files and drops removed ones (the
conversions and features are cached by content as well). Sheet music goes through the ABC adapter,
MIDI through the MTF adapter (--no_adapter for the base); without the C2 checkpoint, the embedded
default's models (make demo). Prints the K best: rank, cosine, kind (abc, musicxml, midi, mtf,
audio, mert) and file (copies with identical content are one result, their other paths listed); --json
prints one JSON object. The search is exact; --approximate searches the index's IVF clusters instead
(built on first use, kept by later updates; for collections of a million pieces and more, see
bench/README.md for its speed and recall).

    python clamp3_search.py --serve FOLDER [--host HOST] [--port PORT] [--max_upload_mb MB] [--soundfont SF2]

serves a search page for FOLDER (http://127.0.0.1:8765/ by default; only this machine can reach it
unless --host is given): a text or an uploaded music file as the query, the format and the model
(the adapters or the base) chosen per query, each hit's score drawn (Verovio) and its sound played
(FluidSynth with a General MIDI soundfont where installed, else a built-in synthesiser), and "more
like this" on every hit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import formats
import rawfile_tools
import runconfig
from fileio import DropLog
from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="?", help="a music file, a .txt file, an image, or the text to search for")
    parser.add_argument("folder", nargs="?", help="folder of music to search (searched recursively)")
    parser.add_argument("--top_k", type=int, default=10, help="how many results (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--format", choices=(*formats.FORMATS, "audio"),
                        help="only sheet music (abc), only MIDI (mtf) or only audio")
    parser.add_argument("--caption", help="the caption of an image query (or a text query by another name)")
    parser.add_argument("--index", help="the index folder (default: one under SEARCH_INDEX_DIR per FOLDER)")
    parser.add_argument("--no_update", action="store_true", help="search the index as it is, without checking FOLDER")
    parser.add_argument("--approximate", action="store_true",
                        help="search the IVF clusters of the index instead of every vector (built on first use)")
    parser.add_argument("--n_probe", type=int, default=32,
                        help="clusters searched with --approximate (more: slower, closer to exact; default: %(default)s)")
    rawfile_tools.add_model_arguments(parser, "clamp3_search")
    page = parser.add_argument_group("the search page (--serve)")
    page.add_argument("--serve", metavar="FOLDER", help="serve a search page for FOLDER instead of one search")
    page.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default: %(default)s, this machine only)")
    page.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    page.add_argument("--max_upload_mb", type=float, default=5.0,
                      help="largest music file a query may upload (default: %(default)s MB)")
    page.add_argument("--soundfont", help="General MIDI soundfont for FluidSynth (default: $SOUNDFONT or the "
                      "distribution's, e.g. /usr/share/sounds/sf2/FluidR3_GM.sf2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if args.serve:
        if args.query is not None:
            parser.error("--serve FOLDER takes no QUERY or FOLDER argument (queries come from the page)")
        if args.max_upload_mb <= 0 or not 0 < args.port < 65536:
            parser.error("--max_upload_mb must be positive and --port between 1 and 65535")
        import search_page  # the page's server and the models: after the arguments

        return search_page.serve(args, cfg)
    if args.query is None or args.folder is None:
        parser.error("give QUERY and FOLDER, or --serve FOLDER")
    if args.top_k < 1:
        parser.error(f"--top_k must be positive, got {args.top_k}")
    if args.n_probe < 1:
        parser.error(f"--n_probe must be positive, got {args.n_probe}")

    def say(message: str) -> None:
        if not args.quiet and not args.json:
            print(message, flush=True)

    embedder = rawfile_tools.open_embedder(args, cfg, show=not args.quiet and not args.json)
    if embedder is None:
        return 2
    import folder_search  # the index and the query embedding need torch: after the arguments

    try:
        query = folder_search.resolve_query(args.query, args.caption, embedder.cfg["CAPTION_MODEL"])
        if not args.no_update:
            rawfile_tools.folder_inputs(args.folder, "search")
        # The query before the folder: a text query loads the weights and the tokenizer, a music file
        # is converted and embedded, so a missing model or a bad query fails in seconds, not after the folder.
        vector, exclude = folder_search.query_vector(embedder, query)
        index_dir = args.index or folder_search.default_index_dir(
            embedder.cfg, args.folder, base_model=not folder_search.uses_adapters(embedder))
        with DropLog("clamp3_search", args.error_log, echo=lambda m: print(m, file=sys.stderr)) as drops:
            bars: list[tqdm] = []  # made when there is something to embed: no empty bar on a no-op update

            def progress(done: int, total: int) -> None:
                if not bars:
                    bars.append(tqdm(total=total, desc="index: embed", unit="file", file=sys.stderr, leave=False,
                                     disable=args.quiet or args.json, dynamic_ncols=True))
                bars[0].update(done - bars[0].n)

            try:
                index = folder_search.open_folder_index(embedder, args.folder, index_dir,
                                                        update=not args.no_update, drops=drops, say=say,
                                                        progress=progress)
            finally:
                for bar in bars:
                    bar.close()
        if not args.no_update and not len(index) and not index.failures:
            raise FileNotFoundError(f"no music file in the search folder {args.folder} (searched recursively for "
                                    f"{' '.join(folder_search.INDEXED_EXTENSIONS)})")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: search_index's errors too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = rawfile_tools.exit_status("search", args.folder, len(index) + len(index.failures),
                                       len(index.failures), args.strict, args.error_log)
    if status == rawfile_tools.EXIT_UNUSABLE:
        return status
    # With --strict and a failed file, the results are printed and the status says so.
    started = time.perf_counter()
    kinds = folder_search.kinds_of_choice(args.format)
    if args.approximate and not index.has_ann:
        say(f"index: building its approximate (IVF) index over {index.n_vectors} pieces")
        index.build_ann()
    hits = index.search(vector, args.top_k, exclude_sha256=exclude, kinds=kinds, approximate=args.approximate,
                        n_probe=args.n_probe)[0]
    seconds = time.perf_counter() - started
    root = index.root or args.folder
    if args.json:
        print(json.dumps({"query": args.query, "query_source": query.source, "query_text": query.text,
                          "folder": args.folder, "root": root, "index": str(index_dir),
                          "n_indexed": len(index), "approximate": args.approximate, "models": embedder.choice.describe(),
                          "search_seconds": seconds, "results": [hit.to_dict() for hit in hits]}, indent=2))
        return status
    say(f"query: {query.source}" + (f": {query.text!r}" if query.text and query.source != "text" else ""))
    print(f"{len(hits)} best of {len(index)} pieces ({seconds * 1000:.1f} ms"
          + (f", approximate, {args.n_probe} clusters probed" if args.approximate else "") + "):")
    for hit in hits:
        copies = f"  (+{len(hit.duplicates)} identical: {', '.join(hit.duplicates)})" if hit.duplicates else ""
        print(f"{hit.rank:>4}  {hit.score:.4f}  {hit.kind:<8}  {hit.path}{copies}")
    return status


if __name__ == "__main__":
    sys.exit(main())
