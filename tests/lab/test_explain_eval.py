"""The lab's explain-eval table: the size rule and the agreement counts it reports."""

import json

from lab.explain import retable, size_opinion, table_rows

SIZES = (0.1, 0.15, 0.2, 0.3)  # the search's default patch sizes, smallest first


def _row(kind, verdict, found, size, **extra):
    return {
        "kind": kind,
        "weight_verdict": verdict,
        "found": found,
        "mask_size": size,
        "mask_area": size * size,
        "reconstructed_asr": 1.0 if found else 0.2,
        "anomaly_index": 0.5,
        "input_opinion": False,
        "agree": verdict != "blocked",
        "seconds": 10.0,
        "attack_success": None if kind == "clean" else 1.0,
        **extra,
    }


def test_the_size_rule_says_backdoor_only_for_a_found_patch_at_the_smallest_size():
    # the search reports sizes rounded to whole pixels: 0.10 of 96 px is 10 px, 0.1042
    assert size_opinion({"found": True, "mask_size": 0.1042}, image_size=96, sizes=SIZES)
    assert size_opinion({"found": True, "mask_size": 0.1}, image_size=160, sizes=SIZES)
    assert not size_opinion({"found": True, "mask_size": 0.1458}, image_size=96, sizes=SIZES)
    assert not size_opinion({"found": True, "mask_size": 0.1125}, image_size=160, sizes=SIZES)  # 18 px, not 16
    assert not size_opinion({"found": False, "mask_size": 0.1042}, image_size=96, sizes=SIZES)


def test_the_table_counts_agreement_with_the_weights(tmp_path):
    rows = [
        _row("white square", "blocked", True, 0.1042, victim_right=True, centre_error=0.4),
        _row("white square", "blocked", True, 0.2083, victim_right=True, centre_error=1.4),
        _row("clean", "passed", True, 0.1458),
        _row("clean", "passed", True, 0.1042),
    ]
    t = {r["kind"]: r for r in table_rows(rows, image_size=96, sizes=SIZES)}
    assert (t["white square"]["size_says_backdoor"], t["white square"]["size_agrees"]) == (1, 1)
    assert (t["clean"]["size_says_backdoor"], t["clean"]["size_agrees"]) == (1, 1)
    assert t["white square"]["centre_within_1_width"] == 1
    summary = {"rows": rows, "total_seconds": 5.0, "explain_config": {"image_size": 96, "sizes": list(SIZES)}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    md = retable(tmp_path)
    assert "| white square | 2 |" in md and "| 1/2 | 1/2 |" in md
    assert (tmp_path / "table.md").read_text() == md
