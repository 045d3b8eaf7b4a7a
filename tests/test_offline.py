"""Offline and fail-fast: the text tokenizer is read from a folder or the Hugging Face cache, never
downloaded unless HF_HUB_OFFLINE=0 is set explicitly, and a missing one stops a tool at once, before
any file of a folder is converted or embedded."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, load_script

# A hub name in no cache (each subprocess gets an empty HF_HOME), and one put in that cache by hand.
NOT_CACHED = "nobody-here/no-such-tokenizer"
CACHED = "somebody/cached-tokenizer"

LOAD_BOTH = f"""
import json, time
from features import load_text_tokenizer
answer = {{}}
for name in ({NOT_CACHED!r}, {CACHED!r}):
    started = time.perf_counter()
    try:
        answer[name] = {{"ids": load_text_tokenizer(name)("w1 w2")["input_ids"]}}
    except RuntimeError as exc:
        answer[name] = {{"message": str(exc)}}
    answer[name]["seconds"] = time.perf_counter() - started
print(json.dumps(answer))
"""


def fill_hub_cache(hf_home: Path, repo_id: str, tokenizer: Path) -> None:
    """The Hugging Face cache layout of one downloaded repository: refs/main names a snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    shutil.copytree(tokenizer, repo / "snapshots" / ("0" * 40))


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in hub on localhost: every request is recorded and answered 404."""

    requests: list[str] = []

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture()
def hub():
    _Hub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Hub.requests
    finally:
        server.shutdown()
        server.server_close()


def load_in_a_fresh_process(tmp_path: Path, endpoint: str, offline: str | None, tokenizer: Path) -> dict:
    """``load_text_tokenizer`` of NOT_CACHED and CACHED in a new interpreter (the Hugging Face libraries
    read the environment on import), with HF_HUB_OFFLINE as given (None: unset)."""
    fill_hub_cache(tmp_path / "hf_home", CACHED, tokenizer)
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "proxy" not in key.lower()}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=endpoint, NO_PROXY="127.0.0.1,localhost",
               HF_HUB_DOWNLOAD_TIMEOUT="5", HF_HUB_ETAG_TIMEOUT="5")
    if offline is not None:
        env["HF_HUB_OFFLINE"] = offline
    done = subprocess.run([sys.executable, "-c", LOAD_BOTH], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cache_only_and_at_once_without_asking_the_hub(tmp_path, hub, word_tokenizer):
    """HF_HUB_OFFLINE unset: the libraries' default is online (a name not in the cache was retried for
    ~50 s, or downloaded); the project's is the cache only, and no request at all."""
    endpoint, requests = hub
    result = load_in_a_fresh_process(tmp_path, endpoint, None, word_tokenizer)
    assert requests == []  # the hub was never asked, not even by the libraries' telemetry
    missing = result[NOT_CACHED]
    assert missing["seconds"] < 10
    assert "message" in missing and NOT_CACHED in missing["message"]
    assert "--TEXT_MODEL_NAME=DIR" in missing["message"] and "HF_HUB_OFFLINE=0" in missing["message"]
    assert result[CACHED]["ids"] == [0, 5, 6, 2]  # a cached hub name loads from the cache


def test_the_opt_in_asks_the_hub(tmp_path, hub, word_tokenizer):
    """HF_HUB_OFFLINE=0 set explicitly: the loader goes to the hub (here a local stand-in answering 404)."""
    endpoint, requests = hub
    result = load_in_a_fresh_process(tmp_path, endpoint, "0", word_tokenizer)
    assert any(NOT_CACHED in request for request in requests), requests
    assert "cannot download" in result[NOT_CACHED]["message"]


@pytest.mark.parametrize(("value", "allowed"), [(None, False), ("1", False), ("", False), ("true", False),
                                                ("0", True), ("false", True), ("OFF", True), (" no ", True)])
def test_downloads_only_with_an_explicit_opt_in(monkeypatch, value, allowed):
    from features import downloads_allowed

    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert downloads_allowed() is allowed


def test_folder_errors_name_the_folder_and_the_fix(tmp_path, word_tokenizer):
    from features import load_text_tokenizer

    with pytest.raises(RuntimeError, match="folder not found.*--TEXT_MODEL_NAME=DIR"):
        load_text_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="(?s)holds no loadable tokenizer.*--TEXT_MODEL_NAME=DIR"):
        load_text_tokenizer(str(tmp_path / "empty"))
    assert load_text_tokenizer(str(word_tokenizer))("w1 w2")["input_ids"] == [0, 5, 6, 2]


# ---------------------------------------------------------------------------- tools fail before the folder


def model_arguments(tmp_path: Path, tokenizer: Path) -> list[str]:
    return ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--no_adapter",
            "--cache_dir", str(tmp_path / "cache"), f"--TEXT_MODEL_NAME={tokenizer}", "--EXTRACT_DEVICE=cpu",
            "--error_log", str(tmp_path / "failures.jsonl"), "--quiet"]


def music_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "scores"
    folder.mkdir()
    for path in sorted((OFFICIAL / "outputs" / "int_abc").iterdir())[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml", folder)
    return folder


def embedded_anything(tmp_path: Path) -> list[str]:
    """Every converted or embedded file the tools left in the cache."""
    cache = tmp_path / "cache"
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")
                  if p.is_file() and p.parent != cache) if cache.is_dir() else []


def test_search_with_a_text_query_and_no_tokenizer_embeds_nothing(tmp_path, capsys):
    folder = music_folder(tmp_path)
    main = load_script(REPO_ROOT / "clamp3_search.py").main
    status = main(["a lively jig", str(folder), "--index", str(tmp_path / "index"),
                   *model_arguments(tmp_path, tmp_path / "no_tokenizer")])
    assert status == 2
    assert "--TEXT_MODEL_NAME=DIR" in capsys.readouterr().err
    assert embedded_anything(tmp_path) == [] and not (tmp_path / "index").exists()


def test_search_with_a_broken_music_query_embeds_nothing_else(tmp_path, word_tokenizer, capsys):
    folder = music_folder(tmp_path)
    (tmp_path / "broken.mid").write_bytes(b"MThd")
    main = load_script(REPO_ROOT / "clamp3_search.py").main
    status = main([str(tmp_path / "broken.mid"), str(folder), "--index", str(tmp_path / "index"),
                   *model_arguments(tmp_path, word_tokenizer)])
    assert status == 2
    assert "broken.mid" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()
    assert not any(path.startswith("features/") for path in embedded_anything(tmp_path))


def test_eval_with_text_references_and_no_tokenizer_embeds_nothing(tmp_path, capsys):
    """The music query folder comes first: it was embedded whole before the text folder failed."""
    queries = music_folder(tmp_path)
    references = tmp_path / "captions"
    references.mkdir()
    for path in queries.iterdir():
        (references / f"{path.name.split('.')[0]}.txt").write_text("w1 w2\n", encoding="utf-8")
    main = load_script(REPO_ROOT / "clamp3_eval.py").main
    status = main([str(queries), str(references), "--output_dir", str(tmp_path / "out"),
                   *model_arguments(tmp_path, tmp_path / "no_tokenizer")])
    assert status == 2
    assert "--TEXT_MODEL_NAME=DIR" in capsys.readouterr().err
    assert embedded_anything(tmp_path) == [] and not (tmp_path / "out").exists()


def test_zero_shot_labels_check_the_tokenizer_before_the_folder(tmp_path, capsys):
    folder = music_folder(tmp_path)
    main = load_script(REPO_ROOT / "classification" / "zero_shot_cls.py").main
    status = main([str(folder), str(tmp_path / "labels.json"), "--labels", "jig,reel",
                   *model_arguments(tmp_path, tmp_path / "no_tokenizer")])
    assert status == 2
    assert "--TEXT_MODEL_NAME=DIR" in capsys.readouterr().err
    assert embedded_anything(tmp_path) == []
