"""``icm-dist ownership``: the division of labour read back from the logged Figure 4 scores.

Pure logic on hand-made log rows (no process group, no training), and the command on a run dir.
"""

from __future__ import annotations

import json

import yaml

from icm_dist.commands import ownership as own
from icm_dist.commands.cli import main as cli_main

NAMES = ["up", "down", "noise"]


def row(it, best: dict, N=3, missing=()):
    """A log row in which expert best[m] has the highest score on mechanism m."""
    r = {"iteration": it, "d_loss": 1.0}
    for m in NAMES:
        if m in missing:
            continue
        for e in range(N):
            r[f"score/{m}/e{e}"] = 0.9 if e == best[m] else 0.1 + 0.01 * e
    return r


def test_leaders_groups_and_ties():
    assert own.leaders(row(10, {"up": 0, "down": 2, "noise": 2}), NAMES, 3) == {"up": 0, "down": 2, "noise": 2}
    assert own.groups({"up": 0, "down": 2, "noise": 2}) == {0: ["up"], 2: ["down", "noise"]}
    tie = {"iteration": 1, **{f"score/{m}/e{e}": 0.5 for m in NAMES for e in range(3)}}
    assert own.leaders(tie, NAMES, 3) == {m: 0 for m in NAMES}  # lowest id, as settle_winners
    # A mechanism without examples in the window has no leader; such rows are not in the timeline.
    assert "noise" not in own.leaders(row(10, {"up": 0, "down": 1, "noise": 2}, missing=("noise",)), NAMES, 3)


def test_verdict_settled_shared_idle_never_led():
    rows = [
        {"iteration": 0, "identity/step": 20},  # identity-init rows carry no scores
        row(10, {"up": 0, "down": 0, "noise": 2}, N=4),
        row(20, {"up": 0, "down": 1, "noise": 2}, N=4),
        row(30, {"up": 0, "down": 1, "noise": 0}, N=4),
        row(40, {"up": 0, "down": 1, "noise": 0}, N=4, missing=("down",)),  # skipped, does not break the run
        row(50, {"up": 0, "down": 1, "noise": 0}, N=4),
    ]
    tl = own.timeline(rows, NAMES, 4)
    assert [it for it, _ in tl] == [10, 20, 30, 50]
    v = own.verdict(tl, 4)
    assert v["settled_at"] == 30
    assert v["shared"] == {0: ["up", "noise"]}
    assert v["idle"] == [2, 3]  # e2 led noise until iteration 20, nothing at the end
    assert v["never_led"] == [3]
    assert own.verdict([], 3)["never_led"] == [0, 1, 2]


def test_command_on_a_run_dir(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    rows = [row(it, {"up": 0, "down": 1, "noise": 2 if it >= 200 else 1}) for it in range(100, 401, 100)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"iteration\": 4")  # cut short
    (d / "summary.json").write_text(json.dumps({"mechanisms": NAMES, "num_experts": 3, "splits": [
        {"iteration": 150, "donor": 1, "copy": 2, "donor_share": 0.6, "copy_share": 0.0}]}))
    assert cli_main(["ownership", str(d), "--every", "100"]) == 0
    out = capsys.readouterr().out
    assert "     100  e0:up e1:down+noise  *" in out
    assert "     200  e0:up e1:down e2:noise  *" in out
    assert "     300  e0:up e1:down e2:noise\n" in out
    assert "settled at iteration 200; at the end shared: none, idle: none; never led a mechanism: none" in out
    assert "  splits: e2 <- e1 at 150" in out
    assert cli_main(["ownership", str(tmp_path / "nothing")]) == 2


def test_a_run_in_progress_names_its_mechanisms_by_their_labels(tmp_path, capsys):
    """No summary yet: the names come from config.yaml's entries, parameterized ones by their labels."""
    d = tmp_path / "run"
    d.mkdir()
    labels = ["up", "left2", "dark"]
    rows = [{"iteration": 100, **{f"score/{m}/e{e}": float(e == j) for j, m in enumerate(labels) for e in range(3)}}]
    (d / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"mechanisms": [
        "up", {"name": "shift", "dx": -2, "label": "left2"}, {"name": "contrast", "gamma": 2.5, "label": "dark"}]},
        "expert": {"num": 3}}))
    assert cli_main(["ownership", str(d), "--every", "100"]) == 0
    assert "     100  e0:up e1:left2 e2:dark  *" in capsys.readouterr().out
