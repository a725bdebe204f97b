"""Table of the 20-episode runs in this folder (run from the repository root):

    python docs/measurements/rtc/ep20/summarize.py

Every strategy x d row of every JSON here; rtc rows at d = 5 are labelled with the run's
rtc_hold_rows (``h0``/``h1``/``h2``; a.json and b.json were written before the config recorded it, with
the default of that time, 2). For d <= 4 the held rows never apply (the plan still has rows after the
frozen ones), so those rows hold for every rtc_hold_rows. Writes summary.json and table.txt here."""
import json
from pathlib import Path

from mode_ros.sim.evaluate import format_delay_table

here = Path(__file__).resolve().parent
order = ["replan", "rtc_replace", "rtc_guidance", "ensemble"]
rows = {}
for f in sorted(here.glob("*.json")):
    if f.name == "summary.json":
        continue
    d = json.loads(f.read_text())
    hold = d["config"].get("rtc_hold_rows")
    hold = 2 if hold is None and f.name in ("a.json", "b.json") else hold
    for key, r in d["results"].items():
        label = r["strategy"]
        if label.startswith("rtc_") and r["d"] == 5:
            label += f" h{hold if hold is not None else 1}"
        rows[f"{label}@{r['d']}"] = {**r, "strategy": label, "file": f.name}


def rank(item):
    r = item[1]
    return order.index(r["strategy"].split()[0]), r["d"], r["strategy"]


report = {"results": dict(sorted(rows.items(), key=rank))}
(here / "summary.json").write_text(json.dumps(report, indent=1))
(here / "table.txt").write_text(format_delay_table(report) + "\n")
print(format_delay_table(report))
