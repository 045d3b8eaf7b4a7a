"""The evaluation chain on the official tiny checkpoint: evaluate_baseline, evaluate_lora, compare_results.

A small test set in the prepare_test_data.py format (ABC with four WikiMT-X fields, MTF with a caption,
three pieces in both formats), one randomised tiny adapter per format, then every report, the summary
and the plots, checked for their fields and for agreeing with one another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS

N_PIECES = 10
N_PAIRED = 3
WIKIMT_FIELDS = ("background", "analysis", "description", "scene")
METRIC_NAMES = {"mrr", "hit@1", "hit@5", "hit@10", "hit@100", "mean_rank"}


def words(rng: np.random.Generator, n: int = 6) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, 200, n))


def smallest_files(folder, suffix: str, n: int, minimum_bytes: int = 200) -> list:
    files = sorted((p for p in folder.glob(f"*{suffix}") if p.stat().st_size >= minimum_bytes),
                   key=lambda p: (p.stat().st_size, p.name))
    return files[:n]


def write_test_set(root) -> None:
    rng = np.random.default_rng(0)
    for fmt, source in (("abc", "wikimt"), ("mtf", "midicaps")):
        (root / fmt).mkdir(parents=True)
        records = []
        folder = OFFICIAL / "outputs" / ("int_abc" if fmt == "abc" else "mtf")
        for i, source_file in enumerate(smallest_files(folder, f".{fmt}", N_PIECES)):
            piece_id = f"{fmt}{i:02d}"
            shutil.copyfile(source_file, root / fmt / f"{piece_id}.{fmt}")
            if fmt == "abc":
                texts = {name: words(rng) for name in WIKIMT_FIELDS}
                if i == 1:
                    texts["description"] = records[0]["texts"]["description"]  # a shared caption
                if i == 2:
                    del texts["scene"]  # texts hold only the fields that exist
            else:
                texts = {"caption": words(rng)}
            record = {"id": piece_id, "filepaths": [f"{fmt}/{piece_id}.{fmt}"], "source": source, "texts": texts}
            if i < N_PAIRED:
                record["pair_id"] = f"pair{i}"
            records.append(record)
        (root / f"test_{fmt}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_adapters(root, first_seed: int = 1) -> dict:
    import formats
    import lora
    import runconfig
    import torch
    from modeling import ModelConfig, load_clamp3

    folders = {}
    for seed, fmt in enumerate(formats.FORMATS, first_seed):
        base = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)
        torch.manual_seed(seed)  # PEFT initialises the LoRA A matrices from the global generator
        model = lora.add_adapter(base, runconfig.build_config(overrides={"LORA_R": 4}), fmt)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        folders[fmt] = root / f"{fmt}_adapter"
        model.save_pretrained(folders[fmt])
    (folders["abc"] / "selection.json").write_text(json.dumps({"format": "abc", "epoch": 2}), encoding="utf-8")
    return folders


@pytest.fixture(scope="module")
def chain(tmp_path_factory, word_tokenizer):
    from evaluation import cli

    root = tmp_path_factory.mktemp("evaluation")
    write_test_set(root / "test")
    adapters = write_adapters(root)
    log_dir = root / "logs"
    log_dir.mkdir()
    history = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.2 / e, "valid_mrr": 0.1 * e} for e in (1, 2, 3)]
    (log_dir / "ABC_history.json").write_text(json.dumps(history), encoding="utf-8")
    results = root / "results"
    settings = [f"--TEST_DATA_DIR={root / 'test'}", f"--RESULTS_DIR={results}", f"--TEXT_MODEL_NAME={word_tokenizer}", "--EVAL_BOOTSTRAP=200",
              "--EXTRACT_DEVICE=cpu", f"--LORA_ABC_ADAPTER_DIR={adapters['abc']}",
              f"--LORA_MTF_ADAPTER_DIR={adapters['mtf']}", f"--LORA_LOG_DIR={log_dir}"]
    common = [f"--weights={TINY_WEIGHTS}", f"--model_config={TINY_MODEL_CONFIG}", *settings]
    assert cli.run_evaluation("baseline", [*common, "--quiet"], "baseline") == 0
    assert cli.run_evaluation("lora", [*common, "--quiet"], "lora") == 0
    assert cli.run_comparison(settings) == 0
    return {"root": root, "results": results, "common": common, "settings": settings, "adapters": adapters}


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def check_summary_block(summary: dict, n: int) -> None:
    assert summary["n_queries"] == n and summary["pool_size"] == n
    for rule in ("official", "expected"):
        assert METRIC_NAMES | {"median_rank"} <= set(summary[rule])
        assert METRIC_NAMES <= set(summary["ci"][rule])
        for metric in METRIC_NAMES - {"mean_rank"}:
            low, high = summary["ci"][rule][metric]
            assert low <= summary[rule][metric] + 1e-12 and summary[rule][metric] <= high + 1e-12
    assert {"mrr", "hit@1", "mean_rank"} <= set(summary["random"])
    assert summary["ci"]["n_resamples"] == 200


@pytest.mark.parametrize("system", ["baseline", "lora"])
def test_each_report_has_every_field(chain, system):
    from fileio import file_sha256

    results = chain["results"]
    report = load(results / f"evaluation_{system}_report.json")
    assert report["system"] == system
    assert report["weights"]["sha256"] == file_sha256(TINY_WEIGHTS)
    assert report["settings"]["tie_rules"].keys() == {"official", "expected"}
    assert report["settings"]["headline_tie_rule"] == "expected"
    assert list(report["sets"]["abc"]["fields"]) == list(WIKIMT_FIELDS)
    assert list(report["sets"]["mtf"]["fields"]) == ["caption"]
    assert report["sets"]["abc"]["n_pieces"] == N_PIECES and report["sets"]["abc"]["source"] == "wikimt"
    for set_name, entry in report["sets"].items():
        for name, field_report in entry["fields"].items():
            n = N_PIECES - 1 if (set_name, name) == ("abc", "scene") else N_PIECES
            assert field_report["n_pairs"] == n
            for direction in ("text_to_music", "music_to_text"):
                check_summary_block(field_report[direction], n)
                assert field_report["caption_level"][direction]["n_queries"] == n
            assert field_report["pair_cosines"]["n_pairs"] == n
    assert report["sets"]["abc"]["fields"]["description"]["caption_level"]["n_groups"] == N_PIECES - 1
    cross = report["cross_format"]
    assert cross["n_pairs"] == N_PAIRED
    for direction in ("sheet_to_midi", "midi_to_sheet"):
        check_summary_block(cross[direction], N_PAIRED)
    assert cross["paper_reference"]["mrr"]["sheet_to_midi"] == 0.4547
    assert any("0.4547" in note and "not ours" in note for note in report["notes"])

    files = report["files"]
    config = load(results / files["config"])
    assert config["config"]["EVAL_BOOTSTRAP"] == 200 and config["weights"]["path"] == str(TINY_WEIGHTS)
    rows = [json.loads(line) for line in (results / files["ranks"]).read_text(encoding="utf-8").splitlines()]
    field_queries = sum(f["n_pairs"] for s in report["sets"].values() for f in s["fields"].values())
    assert len(rows) == field_queries * 2 * 2 + N_PAIRED * 2  # (pair, caption) × directions, plus cross-format
    assert {"query", "official_rank", "expected_rank", "reciprocal_expected_rank"} <= set(rows[0])
    background = [r for r in rows if (r["set"], r["field"], r["level"], r["direction"])
                  == ("abc", "background", "pair", "text_to_music")]
    summary = report["sets"]["abc"]["fields"]["background"]["text_to_music"]
    assert np.mean([r["reciprocal_expected_rank"] for r in background]) == pytest.approx(summary["expected"]["mrr"])
    assert np.mean([1 / r["official_rank"] for r in background]) == pytest.approx(summary["official"]["mrr"])
    with np.load(results / files["similarities"]) as sims:
        assert sims["abc__background__matched"].shape == (N_PIECES,)
        assert sims["abc__background__unmatched"].shape == (N_PIECES * (N_PIECES - 1),)
        assert sims["cross_format__pair_id__matched"].shape == (N_PAIRED,)

    if system == "lora":
        assert report["adapters"]["abc"]["selection"] == {"format": "abc", "epoch": 2}
        assert report["adapters"]["mtf"]["selection"] is None
        assert report["adapters"]["mtf"]["dir"] == str(chain["adapters"]["mtf"].resolve())


def test_adapters_change_music_features_only(chain, word_tokenizer):
    """The adapters move the reported similarities, and on the path the reports take (one base,
    ``lora.with_adapter`` per format, ``extract_set``) only because the music moved: every text
    feature is bit for bit the base's, every set's music features differ."""
    import formats
    import lora
    import runconfig
    from evaluation.reports import discover_test_sets, extract_set
    from features import FeatureExtractor, load_text_tokenizer
    from modeling import ModelConfig, load_clamp3

    results = chain["results"]
    baseline = np.load(results / "evaluation_baseline_similarities.npz")
    adapted = np.load(results / "evaluation_lora_similarities.npz")
    for key in ("abc__analysis__matched", "mtf__caption__matched", "cross_format__pair_id__matched"):
        assert not np.allclose(baseline[key], adapted[key]), key

    cfg = runconfig.build_config(overrides={"TEXT_MODEL_NAME": str(word_tokenizer), "EXTRACT_DEVICE": "cpu"})
    tokenizer = load_text_tokenizer(cfg["TEXT_MODEL_NAME"])
    base = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)
    test_sets = discover_test_sets(chain["root"] / "test", formats.FORMATS)
    assert {test_set.fmt for test_set in test_sets} == set(formats.FORMATS)
    for test_set in test_sets:
        with_adapter = lora.with_adapter(base, chain["adapters"][test_set.fmt])
        plain, moved = (extract_set(FeatureExtractor.from_config(model, cfg, tokenizer=tokenizer, device="cpu"),
                                    test_set, lambda message: None) for model in (base, with_adapter))
        assert plain.music.shape == moved.music.shape and not np.allclose(plain.music, moved.music), test_set.name
        assert plain.texts.keys() == moved.texts.keys() and plain.texts, test_set.name
        for name, (indices, text_features) in plain.texts.items():
            np.testing.assert_array_equal(moved.texts[name][0], indices)
            np.testing.assert_array_equal(moved.texts[name][1], text_features, err_msg=f"{test_set.name}/{name}")


def test_comparison_report_summary_and_plots(chain, capsys):
    results = chain["results"]
    comparison = load(results / "evaluation_comparison_report.json")
    baseline = load(results / "evaluation_baseline_report.json")
    lora_report = load(results / "evaluation_lora_report.json")
    assert "sign-flip" in comparison["test"]["p_value"] and comparison["headline_tie_rule"] == "expected"
    assert set(comparison["results"]) == {"abc", "mtf", "cross_format"}
    entry = comparison["results"]["abc"]["background"]["pair"]["text_to_music"]
    assert entry["n_queries"] == N_PIECES and entry["pool_size"] == N_PIECES
    for rule in ("official", "expected"):
        for metric in METRIC_NAMES:
            row = entry[rule][metric]
            assert {"baseline", "baseline_ci", "lora", "lora_ci", "delta", "delta_ci", "p_value", "verdict"} <= set(row)
            assert row["delta"] == pytest.approx(row["lora"] - row["baseline"])
            assert 0 < row["p_value"] <= 1
        reported = baseline["sets"]["abc"]["fields"]["background"]["text_to_music"][rule]["mrr"]
        assert entry[rule]["mrr"]["baseline"] == pytest.approx(reported)
        reported = lora_report["sets"]["abc"]["fields"]["background"]["text_to_music"][rule]["mrr"]
        assert entry[rule]["mrr"]["lora"] == pytest.approx(reported)
    assert entry["random"] == baseline["sets"]["abc"]["fields"]["background"]["text_to_music"]["random"]
    caption = comparison["results"]["abc"]["description"]["caption"]["text_to_music"]
    assert caption["random"]["mrr"] > entry["random"]["mrr"]  # two pieces share one description

    summary = (results / "evaluation_summary.txt").read_text(encoding="utf-8")
    assert f"abc (wikimt): {N_PIECES} pieces" in summary
    assert f"N = {N_PIECES} queries" in summary and "random MRR" in summary
    assert "[abc / description] text to music (caption level)" in summary
    assert "[abc / scene] text to music (caption level)" not in summary  # no shared text there
    assert "sign-flip" in summary and "0.4547" in summary and "epoch 2" in summary

    plots = sorted(p.name for p in (results / "plots").iterdir())
    expected = {f"{kind}_{s}.png" for kind in ("metrics", "rank_cdf", "similarities")
                for s in ("abc", "mtf", "cross_format")} | {"training_curves.png"}
    assert set(plots) == expected
    for name in plots:
        data = (results / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert sorted(comparison["training_histories"]) == ["abc"]


def test_comparing_a_report_with_itself_gives_no_difference(chain, tmp_path, capsys):
    from evaluation import cli

    report = chain["results"] / "evaluation_baseline_report.json"
    out = tmp_path / "self"
    assert cli.run_comparison([*chain["settings"], f"--baseline={report}", f"--lora={report}", f"--output_dir={out}",
                        "--no_plots"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "evaluation_summary.txt") in printed
    comparison = load(out / "evaluation_comparison_report.json")
    for by_field in comparison["results"].values():
        for by_level in by_field.values():
            for by_direction in by_level.values():
                for entry in by_direction.values():
                    for rule in ("official", "expected"):
                        for metric in METRIC_NAMES:
                            row = entry[rule][metric]
                            assert row["delta"] == 0 and row["delta_ci"] == [0, 0]
                            assert row["p_value"] == pytest.approx(1.0)
                            assert row["verdict"] == "no significant difference"
    summary = (out / "evaluation_summary.txt").read_text(encoding="utf-8")
    assert "no significant difference" in summary and "LoRA better" not in summary


def test_reports_on_different_test_sets_are_refused(chain, tmp_path, capsys):
    from evaluation import cli

    other = tmp_path / "abc_only"
    assert cli.run_evaluation("baseline", [*chain["common"], "--format=abc", f"--output_dir={other}", "--quiet"],
                       "baseline") == 0
    capsys.readouterr()
    rc = cli.run_comparison([*chain["settings"], f"--baseline={other / 'evaluation_baseline_report.json'}",
                      f"--output_dir={tmp_path / 'refused'}"])
    assert rc == 2
    error = capsys.readouterr().err
    assert "not made on the same test sets" in error and "test sets differ" in error
    assert not (tmp_path / "refused" / "evaluation_summary.txt").exists()


def test_missing_adapter_is_a_clear_error(chain, tmp_path, capsys):
    from evaluation import cli

    missing = tmp_path / "no_adapter"
    rc = cli.run_evaluation("lora", [*chain["common"], f"--LORA_MTF_ADAPTER_DIR={missing}",
                              f"--output_dir={tmp_path / 'out'}"], "lora")
    assert rc == 2
    error = capsys.readouterr().err
    assert "LORA_MTF_ADAPTER_DIR" in error and "train_clamp3_lora.py --format mtf" in error and str(missing) in error
    assert not (tmp_path / "out").exists()


def test_missing_test_set_is_a_clear_error(chain, tmp_path, capsys):
    from evaluation import cli

    rc = cli.run_evaluation("baseline", [*chain["common"], f"--TEST_DATA_DIR={tmp_path}", "--quiet"], "baseline")
    assert rc == 2
    assert "prepare_test_data.py" in capsys.readouterr().err


def test_a_third_system_and_any_two_compared(chain, tmp_path, capsys):
    """evaluate_lora.py --name joint evaluates another pair of adapters as its own system;
    compare_results.py --systems pairs any two, with text -> music non-inferiority between two
    adapted systems and the baseline-against-LoRA files left as they were."""
    from evaluation import cli, compare

    results = chain["results"]
    before = {name: (results / name).read_bytes()
              for name in ("evaluation_comparison_report.json", "evaluation_summary.txt")}
    joint = write_adapters(tmp_path, first_seed=3)
    swapped = [f"--LORA_ABC_ADAPTER_DIR={joint['abc']}", f"--LORA_MTF_ADAPTER_DIR={joint['mtf']}"]
    assert cli.run_evaluation("lora", [*chain["common"], *swapped, "--name=joint", "--quiet"], "lora") == 0
    report = load(results / "evaluation_joint_report.json")
    assert report["system"] == "joint" and report["files"]["ranks"] == "evaluation_joint_ranks.jsonl"
    assert report["adapters"]["abc"]["dir"] == str(joint["abc"].resolve())
    assert report["cross_format"]["n_pairs"] == N_PAIRED
    for direction in ("sheet_to_midi", "midi_to_sheet"):
        check_summary_block(report["cross_format"][direction], N_PAIRED)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run_evaluation("lora", [*chain["common"], "--name=baseline"], "lora")
    with pytest.raises(SystemExit):
        cli.run_evaluation("lora", [*chain["common"], "--name=lora_vs_joint"], "lora")
    capsys.readouterr()

    assert cli.run_comparison([*chain["settings"], "--systems", "lora", "joint", "--no_plots"]) == 0
    assert cli.run_comparison([*chain["settings"], "--systems", "baseline", "joint", "--no_plots"]) == 0
    assert before == {name: (results / name).read_bytes() for name in before}
    assert "non_inferiority" not in load(results / "evaluation_comparison_report.json")
    versus_base = load(results / "evaluation_comparison_baseline_vs_joint_report.json")
    assert "non_inferiority" not in versus_base and versus_base["systems"]["candidate"] == "joint"
    comparison = load(results / "evaluation_comparison_lora_vs_joint_report.json")
    assert comparison["systems"] == {**comparison["systems"], "reference": "lora", "candidate": "joint"}
    assert comparison["difference"].startswith("joint − LoRA")
    cross = comparison["results"]["cross_format"]["pair_id"]["pair"]
    joint_ranks, lora_ranks = (load(results / f"evaluation_{s}_report.json")["cross_format"] for s in ("joint", "lora"))
    for direction in ("sheet_to_midi", "midi_to_sheet"):
        for rule in ("official", "expected"):
            row = cross[direction][rule]["mrr"]
            assert row["lora"] == pytest.approx(joint_ranks[direction][rule]["mrr"])
            assert row["baseline"] == pytest.approx(lora_ranks[direction][rule]["mrr"])
            assert row["delta_ci"][0] <= row["delta"] <= row["delta_ci"][1]
            assert row["verdict"] in ("no significant difference", "joint better", "joint worse")
    block = comparison["non_inferiority"]
    assert block["margin"] == 0.02 and block["tie_rule"] == "expected"
    assert [(r["set"], r["field"]) for r in block["rows"]] == [
        *(("abc", name) for name in WIKIMT_FIELDS), ("mtf", "caption")]
    for row in block["rows"]:
        entry = comparison["results"][row["set"]][row["field"]]["pair"]["text_to_music"]
        for rule in ("official", "expected"):
            assert row[rule]["delta_ci"] == entry[rule]["mrr"]["delta_ci"]
            assert row[rule]["non_inferior"] == (entry[rule]["mrr"]["delta_ci"][0] >= -0.02)
    assert block["all"] == all(row["non_inferior"] for row in block["rows"])
    summary = (results / "evaluation_summary_lora_vs_joint.txt").read_text(encoding="utf-8")
    assert "joint against LoRA" in summary and "Δ = joint − LoRA" in summary
    for row in block["rows"]:
        verdict = "yes" if row["non_inferior"] else "no"
        assert any(line.strip().startswith(f"{row['set']}/{row['field']} text → ") and
                   line.endswith(f"non-inferior: {verdict}") for line in summary.splitlines())
    assert f"all {len(block['rows'])} rows: non-inferior: {'yes' if block['all'] else 'no'}" in summary

    # The rule itself, on rows whose intervals sit on either side of the margin.
    def entry(low: float) -> dict:
        mrr = {"baseline": 0.5, "lora": 0.5 + low + 0.01, "delta": low + 0.01, "delta_ci": [low, low + 0.02]}
        return {"n_queries": 7, "official": {"mrr": mrr}, "expected": {"mrr": mrr}}

    synthetic = {"abc": {"a": {"pair": {"text_to_music": entry(-0.02), "music_to_text": entry(-0.5)}},
                         "b": {"pair": {"text_to_music": entry(-0.0201)}}},
                 "mtf": {"c": {"pair": {"text_to_music": entry(0.1)}}}, "cross_format": {}}
    ruled = compare.non_inferiority(synthetic, 0.02)
    assert [row["non_inferior"] for row in ruled["rows"]] == [True, False, True]
    assert not ruled["all"] and ruled["n_non_inferior"] == 2
    assert compare.non_inferiority(synthetic, 0.05)["all"]


def test_scripts_have_help():
    for script in ("evaluate_baseline.py", "evaluate_lora.py", "compare_results.py"):
        done = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "--KEY=value" in done.stdout, done.stderr
