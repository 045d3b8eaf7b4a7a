"""clamp3_search.py on raw folders with the tiny fixture model: text, music and image queries, the
index kept in step with the folder (nothing embedded twice, changes and removals followed), results
sorted and de-duplicated, the adapter of each format."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import folder_search
import numpy as np
import pytest
import rawfiles
import runconfig
import search_index
from embedder import Embedder, choose_models
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, load_script


@pytest.fixture(scope="module")
def search_main():
    return load_script("clamp3_search.py").main


@pytest.fixture()
def scores(tmp_path: Path) -> Path:
    folder = tmp_path / "scores"
    (folder / "midi").mkdir(parents=True)
    for path in sorted((OFFICIAL / "outputs" / "int_abc").iterdir())[:5]:
        shutil.copy(path, folder / path.name)
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml", folder)
    shutil.copy(folder / "bach_bwv1.6.abc", folder / "midi" / "same_as_bwv1.6.abc")  # identical content
    for name in ("edge_multitrack_8.mid", "m21test_test01.mid"):
        shutil.copy(OFFICIAL / "inputs" / "mid" / name, folder / "midi")
    (folder / "notes.txt").write_text("w5 w6\n", encoding="utf-8")  # not music: not indexed
    (folder / "midi" / "broken.mid").write_bytes(b"MThd")
    return folder


def arguments(tmp_path: Path, tokenizer: Path, adapter_dirs: dict[str, Path], *extra: str) -> list[str]:
    return [*extra, "--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--cache_dir",
            str(tmp_path / "cache"), "--index", str(tmp_path / "index"), f"--TEXT_MODEL_NAME={tokenizer}",
            "--EXTRACT_DEVICE=cpu", f"--LORA_ABC_ADAPTER_DIR={adapter_dirs['abc']}",
            f"--LORA_MTF_ADAPTER_DIR={adapter_dirs['mtf']}", "--error_log", str(tmp_path / "failures.jsonl")]


def run_json(main, capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def embedder_for(tokenizer: Path, adapter_dirs: dict[str, Path], tmp_path: Path) -> Embedder:
    cfg = runconfig.build_config(overrides={
        "MODEL_CONFIG": str(TINY_MODEL_CONFIG), "TEXT_MODEL_NAME": str(tokenizer), "EXTRACT_DEVICE": "cpu",
        "LORA_ABC_ADAPTER_DIR": str(adapter_dirs["abc"]), "LORA_MTF_ADAPTER_DIR": str(adapter_dirs["mtf"])})
    return Embedder(choose_models(cfg, weights=TINY_WEIGHTS), cache_dir=tmp_path / "cache")


def test_text_query_ranks_every_piece_by_cosine(tmp_path, scores, word_tokenizer, adapters, search_main,
                                                capsys):
    output = run_json(search_main, capsys, [*arguments(tmp_path, word_tokenizer, adapters, "w1 w2 w3",
                                                       str(scores)), "--top_k", "50"])
    results = output["results"]
    paths = [hit["path"] for hit in results]
    assert output["n_indexed"] == 9  # 5 ABC + 1 MusicXML + 1 copy + 2 MIDI; notes.txt and broken.mid are not in
    assert len(results) == 8 and "midi/same_as_bwv1.6.abc" not in paths  # the copy is folded into its original
    original = next(hit for hit in results if hit["path"] == "bach_bwv1.6.abc")
    assert original["duplicates"] == ["midi/same_as_bwv1.6.abc"]
    assert [hit["rank"] for hit in results] == list(range(1, 9))
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    assert {hit["kind"] for hit in results} == {"abc", "musicxml", "midi"}
    # The scores are the cosines of the raw-file features, each format through its own adapter.
    embedder = embedder_for(word_tokenizer, adapters, tmp_path)
    query = embedder.embed_texts(["w1 w2 w3"])[0]
    for hit in results:
        feature = embedder.embed_files([scores / hit["path"]])[0].feature[0]
        expected = float(np.dot(query, feature) / np.linalg.norm(query) / np.linalg.norm(feature))
        assert abs(hit["score"] - expected) < 1e-5, hit["path"]
    assert "broken.mid" in (tmp_path / "failures.jsonl").read_text(encoding="utf-8")
    midi_only = run_json(search_main, capsys, [*arguments(tmp_path, word_tokenizer, adapters, "w1 w2 w3",
                                                          str(scores)), "--format", "mtf"])
    assert {hit["kind"] for hit in midi_only["results"]} == {"midi"} and len(midi_only["results"]) == 2


def test_music_query_leaves_out_itself_and_its_copies(tmp_path, scores, word_tokenizer, adapters, search_main,
                                                      capsys):
    output = run_json(search_main, capsys, arguments(tmp_path, word_tokenizer, adapters,
                                                     str(scores / "bach_bwv1.6.abc"), str(scores), "--top_k", "3"))
    assert output["query_source"].startswith("music file")
    paths = [hit["path"] for hit in output["results"]]
    assert len(paths) == 3 and not {"bach_bwv1.6.abc", "midi/same_as_bwv1.6.abc"} & set(paths)


def test_the_index_follows_the_folder_without_embedding_twice(tmp_path, scores, word_tokenizer, adapters):
    embedder = embedder_for(word_tokenizer, adapters, tmp_path)
    index_dir = tmp_path / "index"
    _, first, skipped = folder_search.update_index(embedder, scores, index_dir)
    assert len(first.added) == 9 and set(first.failed) == {"midi/broken.mid"} and skipped == ["notes.txt"]
    embedded_before = embedder.summary.embedded
    _, again, _ = folder_search.update_index(embedder, scores, index_dir)
    assert len(again.unchanged) == 9 and not again.embedded and embedder.summary.embedded == embedded_before
    (scores / "bach_bwv67.4.xml").unlink()
    shutil.copy(OFFICIAL / "inputs" / "mid" / "edge_exact_513_patches.mid", scores / "midi" / "m21test_test01.mid")
    index, changed, _ = folder_search.update_index(embedder, scores, index_dir)
    assert changed.removed == ["bach_bwv67.4.xml"] and changed.updated == ["midi/m21test_test01.mid"]
    assert len(index.entries) == 8
    # Another model (the base, no adapters) never reuses these vectors: the index is rebuilt.
    base = Embedder(choose_models(embedder.cfg, weights=TINY_WEIGHTS, no_adapter=True),
                             cache_dir=tmp_path / "cache")
    assert folder_search.index_model_key(base) != folder_search.index_model_key(embedder)
    with pytest.raises(search_index.ModelKeyMismatchError):
        folder_search.update_index(base, scores, index_dir, rebuild=False)
    _, rebuilt, _ = folder_search.update_index(base, scores, index_dir, rebuild=True)
    assert len(rebuilt.added) == 8


def test_image_queries_go_through_a_caption(tmp_path, scores, word_tokenizer, adapters, search_main, capsys,
                                            monkeypatch):
    image = tmp_path / "cover.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    common = arguments(tmp_path, word_tokenizer, adapters, str(image), str(scores))
    assert search_main([*common, "--quiet"]) == 2
    assert "caption" in capsys.readouterr().err
    with_caption = run_json(search_main, capsys, [*common, "--caption", "w1 w2 w3"])
    typed = run_json(search_main, capsys, arguments(tmp_path, word_tokenizer, adapters, "w1 w2 w3", str(scores)))
    assert with_caption["results"] == typed["results"] and with_caption["query_text"] == "w1 w2 w3"
    image.with_suffix(".txt").write_text("w1 w2 w3\n", encoding="utf-8")
    assert run_json(search_main, capsys, common)["results"] == typed["results"]
    image.with_suffix(".txt").unlink()
    # The captioning hook: a module:function the user names in CAPTION_MODEL.
    hook = types.ModuleType("my_captioner")
    hook.caption = lambda path: "w1 w2 w3" if path.endswith("cover.png") else ""
    monkeypatch.setitem(sys.modules, "my_captioner", hook)
    hooked = run_json(search_main, capsys, [*common, "--CAPTION_MODEL=my_captioner:caption"])
    assert hooked["results"] == typed["results"] and "CAPTION_MODEL" in hooked["query_source"]
    assert search_main([*common, f"--CAPTION_MODEL={tmp_path / 'no-model'}", "--quiet"]) == 2
    assert "CAPTION_MODEL folder not found" in capsys.readouterr().err


def test_clear_errors(tmp_path, scores, word_tokenizer, adapters, search_main, capsys):
    song = tmp_path / "song.wav"
    song.write_bytes(b"RIFF")
    assert search_main(arguments(tmp_path, word_tokenizer, adapters, str(song), str(scores))) == 2
    assert "MERT" in capsys.readouterr().err
    assert search_main(arguments(tmp_path, word_tokenizer, adapters, "w1", str(tmp_path / "nowhere"))) == 2
    assert "not found" in capsys.readouterr().err
    assert search_main(arguments(tmp_path, word_tokenizer, adapters, "w1", str(scores), "--no_update")) == 2
    assert "no search index" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory) -> Path:
    """A tiny, randomly initialised BLIP captioning model saved as a local folder, biased to say "reel"."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("captioner")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "tune", "reel", "jig"]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0,
                     "eos_token_id": 3},
        projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias.zero_()
        bias[vocab.index("reel")] = 100.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_local_transformers_captioning_model_captions_an_image(tmp_path, tiny_captioner):
    query = folder_search.resolve_query(str(REPO_ROOT / "data" / "samples" / "cover.png"), None, str(tiny_captioner))
    assert query.text.split()[:3] == ["reel", "reel", "reel"] and "CAPTION_MODEL" in query.source
    broken = tmp_path / "not-an-image.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(rawfiles.RawFileError, match="captioning with .* failed"):
        folder_search.resolve_query(str(broken), None, str(tiny_captioner))


def test_an_index_of_another_folder_is_refused_and_kept(tmp_path, scores, word_tokenizer, adapters, search_main,
                                                        capsys):
    """--index DIR naming the index of another folder used to update it to this folder's files,
    silently removing every entry of the other folder: now it is refused, naming both folders."""
    common = arguments(tmp_path, word_tokenizer, adapters, "w1 w2", str(scores))
    indexed = run_json(search_main, capsys, common)["n_indexed"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(scores / "bach_bwv1.6.abc", other)
    assert search_main(arguments(tmp_path, word_tokenizer, adapters, "w1 w2", str(other))) == 2
    error = capsys.readouterr().err
    assert str(scores.resolve()) in error and str(other.resolve()) in error
    index = search_index.SearchIndex.open(tmp_path / "index", search_index.index_info(tmp_path / "index")["model_key"])
    assert len(index.entries) == indexed  # the other folder's index is as it was


def test_an_update_overtaken_by_another_writer_waits_and_builds_on_it(tmp_path, scores, word_tokenizer, adapters):
    """Two searches of one folder at once: the one whose update another process overtook (it wrote
    first) used to exit 2. Now it waits, plans again from what the other wrote and goes on."""
    embedder = embedder_for(word_tokenizer, adapters, tmp_path)
    index_dir = tmp_path / "index"
    folder_search.update_index(embedder, scores, index_dir)
    extra = sorted((OFFICIAL / "outputs" / "int_abc").iterdir())[6]
    shutil.copy(extra, scores / "new.abc")
    overtaking: list = []

    def progress(done: int, total: int) -> None:
        if not overtaking:  # another writer commits between this update's embedding and its write
            overtaking.append(folder_search.update_index(embedder_for(word_tokenizer, adapters, tmp_path),
                                                         scores, index_dir)[1])

    messages: list[str] = []
    index, summary, _ = folder_search.update_index(embedder, scores, index_dir, progress=progress,
                                                   say=messages.append)
    assert overtaking[0].added == ["new.abc"] and overtaking[0].written
    assert any("updated by another process" in message for message in messages)
    assert not summary.written and not summary.failed  # the other writer's version already holds everything
    assert "new.abc" in {entry.path for entry in index.entries} and len(index.entries) == 10
    assert search_index.wait_for_writer(index_dir, timeout_s=1)


def test_search_follows_the_raw_file_tools_rule(tmp_path, scores, word_tokenizer, adapters, search_main, capsys):
    """A folder with no music is an error naming it; --strict exits 1 when a file of the folder failed
    (broken.mid), after printing the results."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("w1\n", encoding="utf-8")
    assert search_main(arguments(tmp_path, word_tokenizer, adapters, "w1", str(notes), "--quiet")) == 2
    assert f"no music file in the search folder {notes}" in capsys.readouterr().err
    common = arguments(tmp_path, word_tokenizer, adapters, "w1 w2", str(scores))
    assert search_main([*common, "--quiet"]) == 0
    capsys.readouterr()
    assert search_main([*common, "--strict", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "1 of 10 files in the search folder" in captured.err and "best of 9 pieces" in captured.out


def test_the_index_key_follows_the_mert_model(tmp_path, word_tokenizer, adapters):
    """Audio files go through MERT before CLaMP 3's audio tower: other MERT weights at the same path
    make another index key (the index is rebuilt, not mixed), and a missing MERT model one of its own;
    computing the key loads no model."""
    mert = tmp_path / "mert"
    shutil.copytree(OFFICIAL / "mert" / "model", mert)

    def key(path: Path) -> str:
        embedder = embedder_for(word_tokenizer, adapters, tmp_path)
        embedder.cfg["MERT_MODEL_PATH"] = str(path)
        value = folder_search.index_model_key(embedder)
        assert embedder._mert is None  # the key came from the files
        return value

    first = key(mert)
    assert key(mert) == first
    config = mert / "config.json"
    config.write_text(config.read_text() + "\n")
    changed = key(mert)
    assert changed != first and key(tmp_path / "absent") not in (first, changed)


def test_approximate_search_from_the_command_line(tmp_path, scores, word_tokenizer, adapters, search_main, capsys):
    """--approximate builds the index's IVF clusters on first use and keeps them; with every cluster
    probed its hits are the exact search's; --format audio keeps audio only (none here)."""
    common = arguments(tmp_path, word_tokenizer, adapters, "w1 w2 w3", str(scores))
    exact = run_json(search_main, capsys, [*common, "--top_k", "5"])
    approximate = run_json(search_main, capsys, [*common, "--top_k", "5", "--approximate", "--n_probe", "64"])
    assert approximate["approximate"] and not exact["approximate"]
    assert [(h["path"], round(h["score"], 5)) for h in approximate["results"]] == \
        [(h["path"], round(h["score"], 5)) for h in exact["results"]]
    index = search_index.SearchIndex.open(tmp_path / "index", search_index.index_info(tmp_path / "index")["model_key"])
    assert index.has_ann
    assert run_json(search_main, capsys, [*common, "--format", "audio"])["results"] == []


def test_the_base_model_keeps_its_own_default_index(tmp_path, scores, word_tokenizer, adapters, search_main,
                                                    capsys):
    """Without --index, searching with the adapters and with --no_adapter used one index folder, so
    each switch rebuilt it; now the base model's is ``<index>-base`` (as the search page keeps it)."""
    common = arguments(tmp_path, word_tokenizer, adapters, "w1 w2", str(scores))
    at = common.index("--index")
    common = [*common[:at], *common[at + 2:], f"--SEARCH_INDEX_DIR={tmp_path / 'indexes'}"]
    adapted = run_json(search_main, capsys, common)
    base = run_json(search_main, capsys, [*common, "--no_adapter"])
    assert base["index"] == adapted["index"] + "-base"
    again = search_main([*common, "--json"])
    assert again == 0 and json.loads(capsys.readouterr().out)["index"] == adapted["index"]
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == sorted(
        [Path(adapted["index"]).name, Path(base["index"]).name])
