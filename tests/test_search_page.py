"""The search page (``clamp3_search.py --serve``) with the tiny fixture model: the real command serves a
folder on a free local port; its answers are the index's, it serves only the folder's indexed files,
limits uploads and answers bad ones with a message; headless Chromium runs a text and a music query
and finds each hit's score and sound. ``music_render`` on its own: scores, piano rolls, WAV."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
import zipfile
from pathlib import Path

import folder_search
import music_render
import numpy as np
import pytest
import rawfile_tools
import runconfig
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, free_port, load_script

CHROMIUM = os.environ.get("CLAMP3_CHROMIUM", "/usr/bin/chromium")
BROWSER_HINT = ("the browser test needs Debian's Chromium and Playwright's Python driver: apt-get install -y "
                "chromium && .venv/bin/pip install -r requirements-dev.txt (never `playwright install`); "
                "CI (.ci/run) installs both")


def model_arguments(root: Path, tokenizer: Path, adapters: dict[str, Path]) -> list[str]:
    return ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--cache_dir",
            str(root / "cache"), "--index", str(root / "index"), f"--TEXT_MODEL_NAME={tokenizer}",
            "--EXTRACT_DEVICE=cpu", f"--LORA_ABC_ADAPTER_DIR={adapters['abc']}",
            f"--LORA_MTF_ADAPTER_DIR={adapters['mtf']}", f"--MERT_MODEL_PATH={OFFICIAL / 'mert' / 'model'}",
            "--error_log", str(root / "failures.jsonl")]


def make_folder(folder: Path) -> Path:
    (folder / "midi").mkdir(parents=True)
    for name in ("bach_bwv1.6", "bach_bwv67.4", "corelli_opus3no1_1grave", "mozart_k545_movement1_exposition"):
        shutil.copy(OFFICIAL / "outputs" / "int_abc" / f"{name}.abc", folder)
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml", folder)
    for name in ("m21write_bach_bwv315.mid", "m21write_demos_drum_sample.mid"):
        shutil.copy(OFFICIAL / "inputs" / "mid" / name, folder / "midi")
    shutil.copy(OFFICIAL / "outputs" / "mtf" / "m21test_test01.mtf", folder / "midi" / "tune.mtf")
    (folder / "recordings").mkdir()  # a recording, through the tiny MERT model
    shutil.copy(OFFICIAL / "mert" / "inputs" / "s02_chord_stereo_44k1_5p0s.wav", folder / "recordings" / "chord.wav")
    (folder / "notes.txt").write_text("w5 w6\n", encoding="utf-8")  # not music: not indexed, not served
    return folder


def get(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body of one request (errors included)."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


class Page:
    """``clamp3_search.py --serve`` running as its own process on a free port."""

    def __init__(self, root: Path, folder: Path, argv: list[str]):
        self.root, self.folder = root, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        command = [sys.executable, str(REPO_ROOT / "clamp3_search.py"), "--serve", str(folder), "--port",
                   str(self.port), "--max_upload_mb", "0.05", *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
        deadline = time.monotonic() + 240
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the page exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if get(self.url + "/api/info")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the page did not answer:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def api(self, path: str, **kwargs) -> tuple[int, dict]:
        status, _, body = get(self.url + path, **kwargs)
        return status, json.loads(body)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def page(tmp_path_factory, word_tokenizer, adapters):
    root = tmp_path_factory.mktemp("page")
    folder = make_folder(root / "scores")
    (root / "secret.abc").write_text("X:1\nT:secret\nK:C\nCDEF|\n", encoding="utf-8")  # beside, not inside
    running = Page(root, folder, model_arguments(root, word_tokenizer, adapters))
    yield running
    running.stop()


def test_the_page_answers_as_the_index_does(page, word_tokenizer, adapters):
    status, info = page.api("/api/info")
    assert status == 200 and info["n_indexed"] == 9 and info["default_model"] == "adapters"
    assert [m["name"] for m in info["models"]] == ["adapters", "base"]
    status, answer = page.api("/api/search?q=w1%20w2%20w3&k=50")
    assert status == 200 and answer["query"] == {"source": "text", "text": "w1 w2 w3"}
    # The hits are the index's own: the same query vector searched in the index the page built, with
    # the models the page's own options give.
    parser = load_script("clamp3_search.py").build_parser()
    args, cfg = runconfig.parse_args(parser, ["--serve", str(page.folder),
                                              *model_arguments(page.root, word_tokenizer, adapters)])
    embedder = rawfile_tools.embedder_from_args(args, cfg)
    index = folder_search.open_folder_index(embedder, page.folder, page.root / "index", update=False,
                                            say=lambda _: None)
    expected = index.search(embedder.embed_texts(["w1 w2 w3"])[0], 50)[0]
    assert answer["results"] == [hit.to_dict() for hit in expected] and len(expected) == 9
    # The format filter, and the base model (its own index, beside the adapters').
    _, midi = page.api("/api/search?q=w1%20w2%20w3&format=mtf")
    assert {hit["kind"] for hit in midi["results"]} == {"midi", "mtf"} and len(midi["results"]) == 3
    _, recordings = page.api("/api/search?q=w1%20w2%20w3&format=audio")
    assert [hit["path"] for hit in recordings["results"]] == ["recordings/chord.wav"]
    _, base = page.api("/api/search?q=w1%20w2%20w3&model=base&k=50")
    assert {h["path"] for h in base["results"]} == {h["path"] for h in answer["results"]}
    assert [h["score"] for h in base["results"]] != [h["score"] for h in answer["results"]]
    assert (page.root / "index-base").is_dir()
    # More like this: the hit's stored vector, the hit itself left out.
    first = answer["results"][0]["path"]
    _, similar = page.api(f"/api/similar?path={first}&k=3")
    stored = index.search(index.vector(first), 3, exclude_sha256=index.entry(first).sha256)[0]
    assert similar["results"] == [hit.to_dict() for hit in stored] and first not in {
        h["path"] for h in similar["results"]}
    # An uploaded piece: music -> music, the piece (the same content in the folder) left out.
    data = (page.folder / "bach_bwv1.6.abc").read_bytes()
    status, music = page.api("/api/search?name=query.abc&k=3", data=data)
    assert status == 200 and music["query"]["source"] == "music file"
    assert len(music["results"]) == 3 and "bach_bwv1.6.abc" not in {h["path"] for h in music["results"]}


def test_the_page_serves_only_indexed_files_of_the_folder(page):
    for what in ("file", "score", "audio"):
        assert get(f"{page.url}/api/{what}?path=bach_bwv67.4.xml")[0] == 200
        for path in ("../secret.abc", "midi/../../secret.abc", str(page.root / "secret.abc"), "/etc/passwd",
                     "notes.txt", "missing.abc", "", "midi", "..%2Fsecret.abc", "%2E%2E/secret.abc"):
            status, kind, body = get(f"{page.url}/api/{what}?path={path}")
            assert status == 404 and kind == "application/json" and b"T:secret" not in body, (what, path, body)
    status, _, body = get(f"{page.url}/api/file?path=midi/m21write_bach_bwv315.mid")
    assert status == 200 and body == (page.folder / "midi" / "m21write_bach_bwv315.mid").read_bytes()
    # Every answer says what it is and runs nothing but the page's own script.
    headers = urllib.request.urlopen(f"{page.url}/api/score?path=bach_bwv67.4.xml").headers
    assert headers["X-Content-Type-Options"] == "nosniff" and "script-src 'self'" in headers["Content-Security-Policy"]
    assert "attachment" in urllib.request.urlopen(f"{page.url}/api/file?path=bach_bwv67.4.xml").headers[
        "Content-Disposition"]  # a file of the folder is downloaded, never shown as a page
    # Only loopback names are answered (no DNS rebinding onto the folder).
    assert get(f"{page.url}/api/info", headers={"Host": "attacker.example"})[0] == 400


def test_scores_and_sounds_of_every_kind(page):
    for path, notation in (("bach_bwv1.6.abc", "score"), ("bach_bwv67.4.xml", "score"),
                           ("midi/m21write_bach_bwv315.mid", "piano-roll"), ("midi/tune.mtf", "piano-roll")):
        status, kind, svg = get(f"{page.url}/api/score?path={path}")
        assert status == 200 and kind.startswith("image/svg+xml") and svg.lstrip().startswith(b"<svg"), path
        assert urllib.request.urlopen(f"{page.url}/api/score?path={path}").headers["X-Notation"] == notation
        status, kind, sound = get(f"{page.url}/api/audio?path={path}")
        assert status == 200 and kind == "audio/wav" and sound[:4] == b"RIFF", path
        with wave.open(io.BytesIO(sound)) as read:
            assert read.getnframes() / read.getframerate() > 0.5, path
    # A player seeks with byte ranges.
    _, _, whole = get(f"{page.url}/api/audio?path=bach_bwv1.6.abc")
    for asked, part in (("bytes=0-99", whole[:100]), ("bytes=1000-", whole[1000:]), ("bytes=-50", whole[-50:])):
        status, _, body = get(f"{page.url}/api/audio?path=bach_bwv1.6.abc", headers={"Range": asked})
        assert status == 206 and body == part, asked
    assert get(f"{page.url}/api/audio?path=bach_bwv1.6.abc", headers={"Range": f"bytes={len(whole)}-"})[0] == 416
    # A recording is played as it is, and has no score.
    status, kind, sound = get(f"{page.url}/api/audio?path=recordings/chord.wav")
    assert status == 200 and kind == "audio/wav" and sound == (page.folder / "recordings" / "chord.wav").read_bytes()
    status, _, body = get(f"{page.url}/api/score?path=recordings/chord.wav")
    assert status == 422 and "a recording has no score" in json.loads(body)["error"]


def test_uploads_are_limited_and_bad_ones_get_a_message(page):
    cases = [("big.mid", b"MThd" + bytes(60_000), 413, "upload limit"),
             ("broken.mid", b"MThd not midi", 400, "broken.mid could not be read as music"),
             ("virus.exe", b"MZ", 400, "a music query is a file of type"),
             ("../../etc/empty.abc", b"", 400, "empty.abc: the file is empty")]
    for name, data, status, message in cases:
        got, answer = page.api(f"/api/search?name={name}", data=data)
        assert got == status and message in answer["error"], (name, answer)
        assert "Traceback" not in answer["error"]
    for query, message in (("", "type a text"), ("?q=w1&k=0", "k must be between"),
                           ("?q=w1&model=other", "unknown model"), ("?q=w1&format=wav", "format must be")):
        got, answer = page.api(f"/api/search{query}")
        assert got == 400 and message in answer["error"], query
    # A typed path is a text, never a file that is opened.
    _, answer = page.api(f"/api/search?q={page.folder / 'bach_bwv1.6.abc'}")
    assert answer["query"]["source"] == "text" and len(answer["results"]) == 9
    assert page.process.poll() is None  # and the server is still up


def test_serve_takes_no_query(capsys):
    main = load_script("clamp3_search.py").main
    with pytest.raises(SystemExit) as exit_:
        main(["a query", "--serve", "folder"])
    assert exit_.value.code == 2 and "--serve FOLDER takes no QUERY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["only-a-query"])
    assert "give QUERY and FOLDER, or --serve FOLDER" in capsys.readouterr().err


def test_serve_refuses_a_folder_without_music(tmp_path, word_tokenizer, adapters, capsys):
    main = load_script("clamp3_search.py").main
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("w1\n", encoding="utf-8")
    argv = ["--serve", str(tmp_path / "empty"), "--quiet", *model_arguments(tmp_path, word_tokenizer, adapters)]
    assert main(argv) == 2
    assert "no music file in" in capsys.readouterr().err
    assert main(["--serve", str(tmp_path / "nowhere"), "--quiet",
                 *model_arguments(tmp_path, word_tokenizer, adapters)]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_link_out_of_the_folder_is_not_served(tmp_path, word_tokenizer, adapters):
    import search_page

    folder = tmp_path / "scores"
    folder.mkdir()
    shutil.copy(OFFICIAL / "outputs" / "int_abc" / "bach_bwv1.6.abc", folder)
    outside = tmp_path / "outside.abc"
    shutil.copy(OFFICIAL / "outputs" / "int_abc" / "bach_bwv67.4.abc", outside)
    (folder / "link.abc").symlink_to(outside)
    parser = load_script("clamp3_search.py").build_parser()
    args, cfg = runconfig.parse_args(parser, ["--serve", str(folder), "--quiet",
                                              *model_arguments(tmp_path, word_tokenizer, adapters)])
    session = search_page.open_session(args, cfg, say=lambda _: None)
    assert session.run(lambda: session.default_index().entry("link.abc")) is not None  # the folder walk found it
    path, _ = search_page.indexed_file(session, "bach_bwv1.6.abc")
    assert path == (folder / "bach_bwv1.6.abc").resolve()
    with pytest.raises(search_page.PageError) as refused:
        search_page.indexed_file(session, "link.abc")
    assert refused.value.status == 404
    # --no_update: the indexes as they are; the base's, never built, is named with the fix.
    args.no_update = True
    as_it_is = search_page.open_session(args, cfg, say=lambda _: None)
    assert as_it_is.run(lambda: len(as_it_is.default_index())) == 2
    with pytest.raises(search_page.PageError, match="no index of this folder yet") as missing:
        as_it_is.run(as_it_is.index, "base")
    assert missing.value.status == 409


# ---------------------------------------------------------------------------- in a browser
def until(view, expression: str, timeout_s: float = 30) -> None:
    """Wait until a JavaScript expression is true in the page. (Playwright's wait_for_function evaluates
    its predicate with eval, which the page's Content-Security-Policy forbids, as it should.)"""
    deadline = time.monotonic() + timeout_s
    while not view.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {expression}")
        time.sleep(0.1)


@pytest.fixture()
def chromium() -> str:
    """Debian's Chromium with Playwright's driver; skipped (failed in CI) with how to install them."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found = False
    else:
        found = Path(CHROMIUM).is_file()
    if not found:
        if os.environ.get("CI"):
            pytest.fail(BROWSER_HINT)
        pytest.skip(BROWSER_HINT)
    return CHROMIUM


@pytest.mark.slow
def test_a_browser_runs_a_text_and_a_music_query(chromium, page):
    from playwright.sync_api import sync_playwright

    results = REPO_ROOT / "results"
    results.mkdir(exist_ok=True)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, headless=True)
        try:
            view = browser.new_page(viewport={"width": 1100, "height": 1400})
            errors: list[str] = []
            view.on("pageerror", lambda exc: errors.append(str(exc)))
            view.on("console", lambda message: errors.append(message.text)
                    if "Content Security Policy" in message.text else None)  # the page keeps to its policy
            view.goto(page.url + "/")
            until(view, "document.querySelectorAll('#model option').length == 2")
            assert "9 pieces" in view.text_content("#about")

            def hits(expected: int) -> list[str]:
                until(view, f"document.querySelectorAll('#hits li.hit').length == {expected}")
                kinds = view.eval_on_selector_all("#hits li.hit .kind", "items => items.map(i => i.textContent)")
                drawn = sum(kind not in ("audio", "mert") for kind in kinds)  # a recording has no score
                # every score drawn: an SVG image that loaded (a score that failed says so in its note)
                until(view, f"[...document.querySelectorAll('#hits li.hit')].filter(li => "
                                       f"[...li.querySelectorAll('.sheet img')].some(img => img.complete && "
                                       f"img.naturalWidth > 0) || li.querySelector('.note').textContent"
                                       f".startsWith('no score')).length == {drawn}", timeout_s=120)
                failed = view.eval_on_selector_all("#hits .note", "notes => notes.map(n => n.textContent)"
                                                   ".filter(t => t.startsWith('no score'))")
                assert not failed, failed
                assert view.locator("#hits li.hit audio[controls]").count() == expected - kinds.count("mert")
                return view.eval_on_selector_all("#hits li.hit", "items => items.map(i => i.dataset.path)")

            view.fill("#text", "w1 w2 w3")
            view.fill("#k", "4")
            view.click("#go")
            text_hits = hits(4)
            first_score = view.text_content("#hits .score")
            assert view.locator("#message").is_hidden()
            assert "4 best of 9 pieces" in view.text_content("#status")
            # The first hit's sound is a WAV the browser can play.
            ready = view.evaluate("""async () => {
                const audio = document.querySelector('#hits audio');
                audio.preload = 'auto'; audio.load();
                for (let i = 0; i < 600 && !(audio.readyState >= 1 && audio.duration > 0); i++)
                    await new Promise(r => setTimeout(r, 100));
                const response = await fetch(audio.src);
                return [audio.duration, response.headers.get('content-type')];
            }""")
            assert ready[0] > 0.5 and ready[1] == "audio/wav", ready
            view.screenshot(path=str(results / "search_page_text.png"), full_page=True)

            view.set_input_files("#file", str(page.folder / "bach_bwv1.6.abc"))
            view.select_option("#format", "abc")
            view.click("#go")
            until(view, "document.querySelector('#status').textContent.startsWith('music like')")
            music_hits = hits(4)  # the 5 sheet-music pieces but the query itself
            assert "bach_bwv1.6.abc" not in music_hits and music_hits != text_hits
            view.screenshot(path=str(results / "search_page.png"), full_page=True)

            view.locator("#hits li.hit button.more").first.click()
            until(view, "document.querySelector('#status').textContent.startsWith('more like')")
            assert music_hits[0] not in hits(4)

            # The base model, to compare: the same query, its own scores.
            view.select_option("#model", "base")
            view.fill("#text", "w1 w2 w3")
            view.select_option("#format", "all")
            view.click("#go")
            until(view, "document.querySelector('#status').textContent.endsWith('base model, no adapter')")
            hits(4)
            assert view.text_content("#hits .score") != first_score

            bad = page.root / "broken.mid"
            bad.write_bytes(b"MThd not midi")
            view.set_input_files("#file", str(bad))
            view.click("#go")
            view.wait_for_selector("#message:not([hidden])")
            assert "broken.mid could not be read as music" in view.text_content("#message")
            assert "Traceback" not in view.text_content("body") and not errors
        finally:
            browser.close()


# ---------------------------------------------------------------------------- music_render alone
def test_the_synthesiser_plays_each_note_at_its_time():
    notes = [music_render.Note(0.0, 0.5, 69, 100, 0, 0), music_render.Note(1.0, 1.5, 81, 100, 0, 0)]
    samples = music_render.synthesise(notes, sample_rate=8000)
    assert samples.dtype == np.float32 and abs(samples.size / 8000 - 1.62) < 0.01
    first, silence, second = samples[:3600], samples[5000:7900], samples[8100:11600]
    assert np.abs(silence).max() < 1e-3 < np.abs(first).max()
    # the fundamental of each note is where it should be: 440 Hz, then 880 Hz
    for part, expected in ((first, 440), (second, 880)):
        spectrum = np.abs(np.fft.rfft(part))
        assert abs(np.argmax(spectrum) * 8000 / part.size - expected) < 5
    wav = music_render.wav_bytes(samples, 8000)
    with wave.open(io.BytesIO(wav)) as read:
        assert (read.getframerate(), read.getnchannels(), read.getnframes()) == (8000, 1, samples.size)


def test_midi_notes_follow_the_file():
    notes = music_render.midi_notes((OFFICIAL / "inputs" / "mid" / "m21test_test01.mid").read_bytes())
    assert notes and all(0 <= n.start < n.end for n in notes) and all(0 <= n.pitch < 128 for n in notes)
    assert [n.start for n in notes] == sorted(n.start for n in notes)
    with pytest.raises(music_render.RenderError, match="not a readable MIDI file"):
        music_render.midi_notes(b"MThd not midi")
    roll = music_render.piano_roll_svg(notes)
    assert roll.startswith("<svg") and roll.count("<rect") == len(notes) + 1


def test_doubled_and_unreleased_notes_end_where_a_player_would_end_them():
    import mido

    track = mido.MidiTrack()
    for message in (mido.Message("note_on", note=60, velocity=90, time=0),  # doubled: two on, two off
                    mido.Message("note_on", note=60, velocity=90, time=0),
                    mido.Message("note_off", note=60, time=480), mido.Message("note_off", note=60, time=0),
                    mido.Message("note_on", note=62, velocity=90, time=0),  # struck again while sounding
                    mido.Message("note_on", note=62, velocity=90, time=480),
                    mido.Message("note_off", note=62, time=480), mido.Message("note_on", note=64, velocity=90, time=0),
                    mido.MetaMessage("end_of_track", time=240)):  # never released
        track.append(message)
    buffer = io.BytesIO()
    mido.MidiFile(tracks=[track], ticks_per_beat=480).save(file=buffer)  # 120 bpm: 480 ticks = 0.5 s
    notes = [(n.pitch, round(n.start, 3), round(n.end, 3)) for n in music_render.midi_notes(buffer.getvalue())]
    assert notes == [(60, 0.0, 0.5), (60, 0.0, 0.5), (62, 0.5, 1.0), (62, 1.0, 1.5), (64, 1.5, 1.75)]


def test_an_mxl_archive_is_engraved_like_its_score(tmp_path):
    xml = OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml"
    archive = tmp_path / "bach.mxl"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("META-INF/container.xml", '<?xml version="1.0"?><container><rootfiles>'
                     '<rootfile full-path="score/bach.xml"/></rootfiles></container>')
        out.writestr("score/bach.xml", xml.read_bytes())
    same = music_render.musicxml_text(archive) == xml.read_bytes().decode("utf-8")  # no slow diff if not
    assert same and music_render.score(archive, "musicxml").svg == music_render.score(xml, "musicxml").svg
    (tmp_path / "bad.mxl").write_bytes(b"not a zip")
    with pytest.raises(music_render.RenderError, match="not a readable .mxl"):
        music_render.score(tmp_path / "bad.mxl", "musicxml")


@pytest.mark.skipif(not music_render.Synthesiser.detect().fluidsynth, reason="FluidSynth or a soundfont not installed")
def test_fluidsynth_renders_when_installed():
    synthesiser = music_render.Synthesiser.detect()
    wav = synthesiser.wav((OFFICIAL / "inputs" / "mid" / "m21test_test01.mid").read_bytes())
    plain = music_render.Synthesiser(None, None).wav((OFFICIAL / "inputs" / "mid" / "m21test_test01.mid").read_bytes())
    assert wav[:4] == b"RIFF" and wav != plain and "FluidSynth" in synthesiser.describe()


def test_scores_drawn_at_once_are_the_scores_drawn_one_by_one():
    from concurrent.futures import ThreadPoolExecutor

    files = [OFFICIAL / "outputs" / "int_abc" / f"{name}.abc" for name in ("bach_bwv1.6", "corelli_opus3no1_1grave")]
    alone = [music_render.score(path, "abc").svg for path in files]
    with ThreadPoolExecutor(max_workers=4) as pool:  # abc2xml and Verovio hold global state: taken in turn
        together = list(pool.map(lambda path: music_render.score(path, "abc").svg, files * 3))
    assert together == alone * 3


def test_the_render_cache_keeps_the_latest_within_its_bytes():
    import search_page

    cache = search_page.RenderCache(max_bytes=10)
    made: list[str] = []

    def value(name: str):
        return lambda: made.append(name) or name * 4

    for name in ("a", "b", "a", "c"):  # a used again before c comes: b is the one dropped
        cache.get((name,), value(name), len)
    assert made == ["a", "b", "c"]
    assert cache.get(("a",), value("a"), len) == "aaaa" and cache.get(("b",), value("b"), len) == "bbbb"
    assert made == ["a", "b", "c", "b"]
