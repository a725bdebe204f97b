"""Table of the prefix-conditioning runs in this folder (run from the repository root):

    python docs/measurements/rtc/prefix/summarize.py

Rows are labelled with their checkpoint (``prefix``: trained with diffusion.prefix_prob 0.5,
prefix_max_rows 5; ``fixed5``: prefix_prob 0.5 with exactly 5 rows, prefix_min_rows = prefix_max_rows = 5,
i.e. trained for a delay of 5 ticks; ``control``: the same recipe without prefix conditioning) and, for
rtc rows, the run's rtc_decay (``exp`` unless the file name says ``hard``). Writes summary.json and
table.txt here."""
import json
from pathlib import Path

from mode_ros.sim.evaluate import format_delay_table

here = Path(__file__).resolve().parent
rows = {}
for f in sorted(here.glob("*.json")):
    if f.name == "summary.json" or not f.name.startswith(("prefix_", "control_", "fixed5_")):
        continue
    d = json.loads(f.read_text())
    ckpt = f.name.split("_")[0]
    decay = d["config"].get("rtc_decay") or ("hard" if "hard" in f.name else "exp")
    for key, r in d["results"].items():
        label = f"{ckpt} {r['strategy']}" + (f" {decay}" if r["strategy"].startswith("rtc_") else "")
        rows[f"{label}@{r['d']}"] = {**r, "strategy": label, "file": f.name}
report = {"results": dict(sorted(rows.items(), key=lambda kv: (kv[1]["strategy"], kv[1]["d"])))}
(here / "summary.json").write_text(json.dumps(report, indent=1))
(here / "table.txt").write_text(format_delay_table(report) + "\n")
print(format_delay_table(report))
for key, r in report["results"].items():
    weak = {t.removesuffix("-v3"): v["success_rate"] for t, v in r["tasks"].items() if v["success_rate"] < 1}
    print(f"{key:32s} below 1.0: {weak}")
