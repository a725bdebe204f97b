"""Merge the per-process JSONs of `mode-ros sim eval --delay-ticks` here into summary.json + table.txt
(for each strategy x d the row covering the most tasks).
Usage: python docs/measurements/rtc/merge.py [FOLDER]   (default: this folder; e.g. ep20/)"""
import json
import sys
from pathlib import Path

from mode_ros.sim.evaluate import format_delay_table

here = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent
best: dict = {}
for f in sorted(here.glob("*.json")):
    if f.name == "summary.json":
        continue
    for key, row in json.loads(f.read_text()).get("results", {}).items():
        if key not in best or len(row["tasks"]) > len(best[key]["tasks"]):
            best[key] = {**row, "file": f.name}
order = ["replan", "rtc_replace", "rtc_guidance", "ensemble", "open_loop"]
rows = dict(sorted(best.items(), key=lambda kv: (order.index(kv[1]["strategy"]), kv[1]["d"])))
report = {"results": rows}
(here / "summary.json").write_text(json.dumps(report, indent=1))
(here / "table.txt").write_text(format_delay_table(report) + "\n")
print(format_delay_table(report))
