"""``clamp3_search.py --serve FOLDER``: a search page for one folder of music, in the browser.

A query is a text (any language the text tower reads) or an uploaded music file or recording
(music → music); the page lists the best hits with their cosine and file name, each with its score
drawn (``music_render``: Verovio for sheet music, a piano roll for MIDI; a recording has none), a
player of its sound (synthesised from its MIDI; a recording as it is), and "more like this" (a music →
music query with the hit's stored vector, nothing embedded). A format filter (sheet music, MIDI,
recordings) and the model (the adapters, or the base, to compare) are chosen per query.

**Models and indexes.** The models are the raw-file tools' (``embedder.choose_models``: the C2
checkpoint, else the demo's). With adapters, the page offers two models: ``adapters`` (sheet music
through the ABC adapter, MIDI through the MTF adapter, as ``clamp3_search.py`` does, in the same
index folder) and ``base`` (``--no_adapter``), whose index lives beside it (``<index>-base``) so the
two never rebuild each other. The default model's index is brought up to date at start; the other's
on its first query.

**Safe by default.** The server binds 127.0.0.1 unless a host is given, and then answers only
requests addressed to a loopback name (``TrustedHostMiddleware``: a web page elsewhere cannot reach it
by a DNS rebinding). It serves the page's own files and files of the indexed folder only: a path is
served when it is a file the index holds, inside the folder once symbolic links are resolved; any
other path (``..``, absolute, outside, not indexed) is refused with 404. Uploads are limited to
``max_upload_bytes`` (413) and read into a private temporary folder; a file the converters cannot
read comes back as a message, never as a traceback (those go to the server's log only). A text
query is always a text: a typed path is never opened.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import folder_search
import formats
import music_render
import numpy as np
import rawfile_tools
import rawfiles
from embedder import Embedder
from fileio import DropLog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).resolve().parent / "webpage"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 5.0
MAX_TOP_K = 100
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# What a user may upload as a music query: sheet music, MIDI and recordings (MERT arrays are not
# music a person has).
UPLOAD_EXTENSIONS = tuple(sorted(ext for ext, kind in formats.KIND_OF_EXTENSION.items()
                                 if kind in formats.MUSIC_KINDS or kind in music_render.RECORDING_KINDS))
# The format filter: the two symbolic formats, and recordings (audio files and MERT features).
AUDIO = "audio"
RECORDING_KINDS = tuple(sorted(kind for kind, modality in formats.MODALITY_OF_KIND.items() if modality == "audio"))
FILTERS = {fmt: formats.KINDS_OF_FORMAT[fmt] for fmt in formats.FORMATS} | {AUDIO: RECORDING_KINDS}
AUDIO_MEDIA_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".flac": "audio/flac", ".ogg": "audio/ogg"}
RENDER_CACHE_BYTES = 256 * 2**20  # scores and sounds kept for the next request
# The page's own script and style only; scores come back as blob: images, sound from the server.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' blob:; media-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                           "base-uri 'none'; form-action 'self'")
ADAPTERS, BASE = "adapters", "base"

log = logging.getLogger("clamp3_search.page")
T = TypeVar("T")


class PageError(Exception):
    """A request the page answers with a message: its HTTP status and the text shown to the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------- models and their indexes
@dataclass
class PageModel:
    """One model the page can search with: its embedder, its index folder, the index once opened."""

    name: str
    label: str
    embedder: Embedder
    index_dir: Path
    index: Any = None


@dataclass
class SearchSession:
    """What the page searches: the folder, the models, and the one thread that runs them. Every use of a
    model or an index goes through ``run`` on that thread (one query at a time, and the index used
    from the thread that opened it, whatever its storage allows); scores and sound are drawn beside it."""

    folder: Path
    models: dict[str, PageModel]
    default_model: str
    synthesiser: music_render.Synthesiser
    max_upload_bytes: int
    say: Callable[[str], None] = print
    update: bool = True  # False (--no_update): each index searched as it is, the folder not walked
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="search_page_models"))

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the models' thread; its exception, if any, raised here."""
        return self.worker.submit(function, *args).result()

    def index(self, name: str) -> Any:
        """The model's index, opened (and brought up to date) on first use."""
        if name not in self.models:
            raise PageError(400, f"unknown model {name!r}; this page has: {', '.join(self.models)}")
        model = self.models[name]
        if model.index is None:
            bars: dict[str, float] = {"last": 0.0}

            def progress(done: int, total: int) -> None:
                if time.monotonic() - bars["last"] > 5 or done == total:
                    bars["last"] = time.monotonic()
                    self.say(f"index ({model.name}): embedded {done}/{total} files")

            try:
                model.index = folder_search.open_folder_index(model.embedder, self.folder, model.index_dir,
                                                              update=self.update, drops=DropLog("search_page"),
                                                              say=self.say, progress=progress)
            except FileNotFoundError as exc:
                if self.update:
                    raise
                raise PageError(409, f"the {model.label} has no index of this folder yet ({exc}); serve "
                                "without --no_update once to build it") from exc
        return model.index

    def default_index(self) -> Any:
        return self.index(self.default_model)


def page_models(args: argparse.Namespace, cfg: dict[str, Any], folder: Path) -> tuple[dict[str, PageModel], str]:
    """The models the page offers (see the module docstring) and the default one's name."""
    first = rawfile_tools.embedder_from_args(args, cfg)
    index_dir = Path(args.index) if args.index else folder_search.default_index_dir(first.cfg, folder)
    adapters = {fmt: path for fmt, path in first.choice.adapters.items() if path}
    base_index = index_dir.with_name(index_dir.name + "-base")  # default_index_dir's for the base model too
    if not adapters:
        why = "--no_adapter" if args.no_adapter else "no adapter found"
        return {BASE: PageModel(BASE, f"base model ({why})", first, base_index)}, BASE
    no_adapter = copy.copy(args)
    no_adapter.no_adapter = True
    base = rawfile_tools.embedder_from_args(no_adapter, cfg)
    label = "adapters (" + ", ".join(f"{fmt.upper()}: {path.name}" for fmt, path in adapters.items()) + ")"
    return {ADAPTERS: PageModel(ADAPTERS, label, first, index_dir),
            BASE: PageModel(BASE, "base model, no adapter", base, base_index)}, \
        ADAPTERS


# ---------------------------------------------------------------------------- files of the folder
def indexed_file(session: SearchSession, relpath: str) -> tuple[Path, Any]:
    """The file of the folder that ``relpath`` names and its index entry; 404 for anything else:
    a path outside the folder (``..``, absolute, a link out), a file the index does not hold."""
    refused = PageError(404, f"not a file of the indexed folder: {relpath!r}")
    if not relpath or "\x00" in relpath or relpath.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relpath):
        raise refused
    root = session.folder.resolve()
    path = (root / relpath).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise refused
    entry = session.run(lambda: session.default_index().entry(path.relative_to(root).as_posix()))
    if entry is None:
        raise refused
    return path, entry


class RenderCache:
    """The last renders (scores, sounds) by file, its size and mtime (a changed file is drawn again),
    up to ``max_bytes`` in all, the least recently used dropped first."""

    def __init__(self, max_bytes: int = RENDER_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], Any], size: Callable[[Any], int]) -> Any:
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                return self._store[key][0]
        value = make()
        with self._lock:
            if key not in self._store:
                self._store[key] = (value, size(value))
                self._bytes += self._store[key][1]
            while self._bytes > self.max_bytes and len(self._store) > 1:
                self._bytes -= self._store.popitem(last=False)[1][1]
        return value


def byte_range_response(request: Request, data: bytes, media_type: str) -> Response:
    """``data``, or the one byte range the request asks for (206), so a player can seek in it."""
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
    asked = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("range", "").strip())
    if not asked or not (asked.group(1) or asked.group(2)):
        return Response(data, media_type=media_type, headers=headers)
    first, last = asked.groups()
    if first:
        start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
    else:  # the last N bytes
        start, end = max(len(data) - int(last), 0), len(data) - 1
    if start >= len(data) or start > end:
        return Response(b"", status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"})
    return Response(data[start:end + 1], status_code=206, media_type=media_type,
                    headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


def _render_key(what: str, path: Path) -> tuple:
    stat = path.stat()
    return what, str(path), stat.st_size, stat.st_mtime_ns


# ---------------------------------------------------------------------------- queries
def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise PageError(400, f"{name} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise PageError(400, f"{name} must be between {low} and {high}, got {number}")
    return number


def _kinds(request: Request) -> tuple[str, ...] | None:
    fmt = request.query_params.get("format") or "all"
    if fmt == "all":
        return None
    if fmt not in FILTERS:
        raise PageError(400, f"format must be all, {' or '.join(FILTERS)}; got {fmt!r}")
    return FILTERS[fmt]


def _results(session: SearchSession, name: str, vector: np.ndarray, k: int, kinds: tuple[str, ...] | None,
             exclude: str | None, query: dict[str, Any]) -> dict[str, Any]:
    index = session.index(name)
    started = time.perf_counter()
    hits = index.search(vector, k, exclude_sha256=exclude, kinds=kinds)[0]
    seconds = time.perf_counter() - started
    return {"query": query, "model": name, "model_label": session.models[name].label,
            "n_indexed": len(index), "search_ms": round(seconds * 1000, 2),
            "results": [hit.to_dict() for hit in hits]}


def _query_options(session: SearchSession, request: Request) -> tuple[str, int, tuple[str, ...] | None]:
    name = request.query_params.get("model") or session.default_model
    if name not in session.models:
        raise PageError(400, f"unknown model {name!r}; this page has: {', '.join(session.models)}")
    return name, _int_param(request, "k", 10, 1, MAX_TOP_K), _kinds(request)


def text_search(session: SearchSession, request: Request) -> dict[str, Any]:
    text = (request.query_params.get("q") or "").strip()
    if not text:
        raise PageError(400, "type a text to search for, or choose a music file")
    name, k, kinds = _query_options(session, request)

    def answer() -> dict[str, Any]:
        vector = session.models[name].embedder.embed_texts([text])[0]
        return _results(session, name, vector, k, kinds, None, {"source": "text", "text": text})

    return session.run(answer)


def similar_search(session: SearchSession, request: Request) -> dict[str, Any]:
    relpath = request.query_params.get("path") or ""
    _, entry = indexed_file(session, relpath)
    name, k, kinds = _query_options(session, request)

    def answer() -> dict[str, Any]:
        vector = session.index(name).vector(entry.path)
        if vector is None:
            raise PageError(404, f"{entry.path} is not in the {name} index")
        return _results(session, name, vector, k, kinds, entry.sha256,
                        {"source": "more like this", "path": entry.path})

    return session.run(answer)


def _upload_name(raw: str) -> str:
    """The uploaded file's name reduced to a safe base name (letters, digits, ``._-``), extension kept."""
    name = Path(raw.replace("\\", "/")).name
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80].strip("._") or "upload"
    return stem + suffix


async def _read_upload(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = PageError(413, f"the file is larger than the upload limit of {limit / 1e6:.1f} MB")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def music_search(session: SearchSession, request: Request, data: bytes) -> dict[str, Any]:
    name = _upload_name(request.query_params.get("name") or "")
    suffix = Path(name).suffix
    if suffix not in UPLOAD_EXTENSIONS:
        raise PageError(400, f"{name}: a music query is a file of type {' '.join(UPLOAD_EXTENSIONS)}"
                        + (f", not {suffix}" if suffix else ""))
    if not data:
        raise PageError(400, f"{name}: the file is empty")
    model, k, kinds = _query_options(session, request)
    with tempfile.TemporaryDirectory(prefix="clamp3_upload_") as folder:
        path = Path(folder) / name
        path.write_bytes(data)

        def answer() -> dict[str, Any]:
            try:
                vector, sha = folder_search.query_vector(session.models[model].embedder,
                                                         folder_search.Query(f"uploaded {name}", path=path))
            except rawfiles.RawFileError as exc:
                raise PageError(400, f"{name} could not be read as music ({exc.stage}): {exc.reason}") from exc
            return _results(session, model, vector, k, kinds, sha, {"source": "music file", "name": name})

        return session.run(answer)


# ---------------------------------------------------------------------------- the app
def build_app(session: SearchSession, allowed_hosts: list[str] | None = None) -> Starlette:
    """The page's web app for ``session``. ``allowed_hosts``: the Host names it answers (None: any)."""
    renders = RenderCache()

    def info(request: Request) -> JSONResponse:
        n_indexed, failures = session.run(lambda: (len(session.default_index()),
                                                   len(getattr(session.default_index(), "failures", ()))))
        return JSONResponse({
            "folder": str(session.folder), "n_indexed": n_indexed, "n_failed": failures,
            "models": [{"name": m.name, "label": m.label} for m in session.models.values()],
            "default_model": session.default_model, "describe": session.models[session.default_model]
            .embedder.choice.describe(), "synthesiser": session.synthesiser.describe(),
            "formats": [{"name": "all", "label": "all music"}, {"name": "abc", "label": "sheet music (ABC, MusicXML)"},
                        {"name": "mtf", "label": "MIDI (MIDI, MTF)"},
                        {"name": AUDIO, "label": "recordings (audio, MERT features)"}],
            "upload_extensions": list(UPLOAD_EXTENSIONS), "max_upload_bytes": session.max_upload_bytes,
            "max_top_k": MAX_TOP_K})

    async def search(request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        if request.method == "POST":
            data = await _read_upload(request, session.max_upload_bytes)
            return JSONResponse(await run_in_threadpool(music_search, session, request, data))
        return JSONResponse(await run_in_threadpool(text_search, session, request))

    def similar(request: Request) -> JSONResponse:
        return JSONResponse(similar_search(session, request))

    def score(request: Request) -> Response:
        path, entry = indexed_file(session, request.query_params.get("path") or "")
        try:
            drawn = renders.get(_render_key("score", path), lambda: music_render.score(path, entry.kind),
                                lambda score: len(score.svg))
        except music_render.RenderError as exc:
            raise PageError(422, str(exc)) from exc
        return Response(drawn.svg, media_type="image/svg+xml",
                        headers={"X-Notation": "score" if drawn.notation else "piano-roll",
                                 "X-Score-Pages": str(drawn.pages), "Cache-Control": "no-cache"})

    def audio(request: Request) -> Response:
        path, entry = indexed_file(session, request.query_params.get("path") or "")
        if entry.kind in music_render.RECORDING_KINDS:  # a recording is its own sound
            return FileResponse(path, media_type=AUDIO_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

        def make() -> bytes:
            return session.synthesiser.wav(music_render.file_midi(path, entry.kind))

        try:
            wav = renders.get(_render_key("audio", path), make, len)
        except music_render.RenderError as exc:
            raise PageError(422, str(exc)) from exc
        return byte_range_response(request, wav, "audio/wav")

    def raw_file(request: Request) -> FileResponse:
        path, _ = indexed_file(session, request.query_params.get("path") or "")
        return FileResponse(path, filename=path.name)

    def page(request: Request) -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def page_error(request: Request, exc: PageError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log; the page gets a message without one.
        log.error("%s %s failed:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return JSONResponse({"error": f"the server could not answer ({type(exc).__name__}: {exc}); "
                             "the details are in the server's log"}, status_code=500)

    routes = [Route("/", page), Route("/api/info", info), Route("/api/search", search, methods=["GET", "POST"]),
              Route("/api/similar", similar), Route("/api/score", score), Route("/api/audio", audio),
              Route("/api/file", raw_file)]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={PageError: page_error, HTTPException: http_error, Exception: unexpected})
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    return app


class SecurityHeaders:
    """ASGI middleware: every response says what it is (``nosniff``), may not be framed, and runs
    only the page's own script (``CONTENT_SECURITY_POLICY``); a score opened on its own runs nothing."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                            (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def allowed_hosts_for(host: str) -> list[str] | None:
    """Loopback names only when bound to loopback (see the module docstring); any when bound elsewhere."""
    return ["127.0.0.1", "localhost", "[::1]", "::1"] if host in LOOPBACK_HOSTS else None


def open_session(args: argparse.Namespace, cfg: dict[str, Any], say: Callable[[str], None] = print) -> SearchSession:
    """The page's session for ``args.serve``: models chosen, the default model's index brought up to
    date. Raises ``FileNotFoundError``/``ValueError``/``RuntimeError`` with the reason."""
    folder = Path(args.serve)
    rawfile_tools.folder_inputs(folder, "search")
    models, default = page_models(args, cfg, folder)
    synthesiser = music_render.Synthesiser.detect(getattr(args, "soundfont", None))
    session = SearchSession(folder=folder, models=models, default_model=default, synthesiser=synthesiser,
                            max_upload_bytes=int(args.max_upload_mb * 1e6), say=say, update=not args.no_update)
    for line in models[default].embedder.choice.describe():
        say(line)
    if not session.run(lambda: len(session.default_index())):
        raise FileNotFoundError(f"no music file in {folder} could be indexed (searched recursively for "
                                f"{' '.join(folder_search.INDEXED_EXTENSIONS)})")
    say(f"sound: {synthesiser.describe()}")
    return session


class BackgroundServer:
    """The app served by uvicorn in a thread (tests, and anything else that needs the page running
    beside it); ``stop`` ends it."""

    def __init__(self, app: Starlette, host: str, port: int):
        import uvicorn

        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the search page did not start on {self.url}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """``clamp3_search.py --serve``: the session opened, then served until interrupted."""
    import uvicorn

    def say(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        session = open_session(args, cfg, say=say)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = build_app(session, allowed_hosts_for(args.host))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    n_pieces = session.run(lambda: len(session.default_index()))
    print(f"search page: http://{shown}:{args.port}/  ({n_pieces} pieces of {session.folder}; "
          "Ctrl-C stops it)", flush=True)
    if args.host not in LOOPBACK_HOSTS:
        print(f"note: --host {args.host} makes the page (and the folder's files) reachable from other machines",
              flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
