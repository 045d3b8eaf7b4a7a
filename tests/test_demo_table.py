"""demo.table: the README's demo table from comparison reports, one row per test field and direction,
in-family rows first, the range of Δ over seeds."""

from __future__ import annotations

import json

from demo import table


def entry(baseline: float, lora: float, ci: list[float], n: int = 200) -> dict:
    row = {"baseline": baseline, "lora": lora, "delta": lora - baseline, "delta_ci": ci, "p_value": 0.001}
    return {"n_queries": n, "expected": {"mrr": row}, "official": {"mrr": row}}


def comparison(shift: float = 0.0) -> dict:
    text = {"text_to_music": None, "music_to_text": None}
    sets = {}
    for set_name in ("abc", "mtf"):
        sets[set_name] = {
            "heldout_language_it": {"pair": {**text, "text_to_music": entry(0.1, 0.12 + shift, [-0.01, 0.05])}},
            "caption_en": {"pair": {**text, "text_to_music": entry(0.2, 0.4 + shift, [0.15, 0.25])}},
            "heldout_family_en": {"pair": {**text, "text_to_music": entry(0.15, 0.2 + shift, [0.01, 0.09])}},
            "background": {"pair": {**text, "text_to_music": entry(0.5, 0.5, [0.0, 0.0])}},  # not a demo field
        }
        for field in sets[set_name].values():
            field["pair"] = {k: v for k, v in field["pair"].items() if v is not None}
    sets["cross_format"] = {"pair_id": {"pair": {"sheet_to_midi": entry(0.03, 0.2, [0.1, 0.3]),
                                                 "midi_to_sheet": entry(0.03, 0.19, [0.1, 0.3])}}}
    return {"results": sets}


def test_rows_come_in_kind_order_with_their_numbers():
    text = table.markdown([comparison()])
    lines = text.splitlines()
    assert lines[0].startswith("| query → reference | N | base | adapter | Δ [95% CI] | p |")
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert labels == ["in-family: English caption → sheet music (ABC adapter)",
                      "in-family: English caption → MIDI (MTF adapter)",
                      "held-out family: English caption → sheet music (ABC adapter)",
                      "held-out family: English caption → MIDI (MTF adapter)",
                      "held-out language: Italian caption → sheet music (ABC adapter)",
                      "held-out language: Italian caption → MIDI (MTF adapter)",
                      "sheet → MIDI (ABC adapter → MTF adapter)", "MIDI → sheet"]
    assert "| 200 | 0.200 | 0.400 | **+0.200** [+0.150, +0.250] | 0.001 |" in lines[2]
    assert "| +0.020 [-0.010, +0.050] |" in lines[6]  # not distinguishable from 0: not bold


def test_several_seeds_add_the_range_of_delta(tmp_path):
    folders = []
    for number, shift in enumerate((0.0, 0.05, -0.02)):
        folder = tmp_path / f"seed{number}"
        folder.mkdir()
        (folder / "evaluation_comparison_report.json").write_text(json.dumps(comparison(shift)), encoding="utf-8")
        folders.append(str(folder))
    assert table.main(folders) == 0
    assert table.main([str(tmp_path / "missing")]) == 2
    text = table.markdown([comparison(s) for s in (0.0, 0.05, -0.02)])
    assert "Δ over 3 seeds" in text.splitlines()[0]
    assert text.splitlines()[2].endswith("| +0.180 to +0.250 |")


def joint_comparison(shift: float = 0.0) -> dict:
    """LoRA against joint: the separate adapters' MRR (comparison()'s 'lora') in the reference slot."""
    sets = {}
    for set_name in ("abc", "mtf"):
        sets[set_name] = {
            "caption_en": {"pair": {"text_to_music": entry(0.4 + shift, 0.39 + shift, [-0.03, 0.01])}},
            "heldout_family_en": {"pair": {"text_to_music": entry(0.2 + shift, 0.21 + shift, [-0.01, 0.03])}},
        }
    sets["cross_format"] = {"pair_id": {"pair": {"sheet_to_midi": entry(0.2, 0.35 + shift, [0.1, 0.2]),
                                                 "midi_to_sheet": entry(0.19, 0.2, [-0.02, 0.04])}}}
    return {"results": sets, "non_inferiority": {"margin": 0.02}}


def test_the_joint_table_has_base_separate_and_joint_with_non_inferiority(tmp_path):
    from evaluation.results import comparison_names
    from formats import JOINT, LORA

    assert table.JOINT_COMPARISON == comparison_names(LORA, JOINT)["report"]
    lines = table.joint_markdown([(comparison(), joint_comparison())]).splitlines()
    assert lines[0].startswith("| query → reference | N | base | separate | joint | Δ joint − separate [95% CI] | p |")
    assert "non-inferior (Δ ≥ −0.02)" in lines[0]
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert labels == ["sheet → MIDI (ABC adapter → MTF adapter)", "MIDI → sheet",
                      "in-family: English caption → sheet music (ABC adapter)",
                      "in-family: English caption → MIDI (MTF adapter)",
                      "held-out family: English caption → sheet music (ABC adapter)",
                      "held-out family: English caption → MIDI (MTF adapter)"]
    assert lines[2].endswith("| 200 | 0.030 | 0.200 | 0.350 | **+0.150** [+0.100, +0.200] | 0.001 | – |")
    assert lines[3].endswith("| +0.010 [-0.020, +0.040] | 0.001 | – |")  # interval holds 0: not bold
    assert lines[4].endswith("| 200 | 0.200 | 0.400 | 0.390 | -0.010 [-0.030, +0.010] | 0.001 | no |")
    assert lines[6].endswith("| 0.150 | 0.200 | 0.210 | +0.010 [-0.010, +0.030] | 0.001 | yes |")

    seeds = [(comparison(s), joint_comparison(s)) for s in (0.0, 0.05)]
    for number, (separate, joint) in enumerate(seeds):
        folder = tmp_path / f"seed{number}"
        folder.mkdir()
        (folder / table.SEPARATE_COMPARISON).write_text(json.dumps(separate), encoding="utf-8")
        (folder / table.JOINT_COMPARISON).write_text(json.dumps(joint), encoding="utf-8")
    several = table.joint_markdown(seeds).splitlines()
    assert several[0].endswith("| Δ over 2 seeds |")
    assert several[2].endswith("| – | +0.150 to +0.200 |")
    assert several[4].endswith("| no (0 of 2 seeds) | -0.010 to -0.010 |")
    assert table.main(["--joint", str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 0
    (tmp_path / "seed1" / table.JOINT_COMPARISON).unlink()
    assert table.main(["--joint", str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 2
    assert table.main([str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 0  # the separate table needs no joint run
