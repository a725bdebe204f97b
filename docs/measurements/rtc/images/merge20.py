"""Twenty held-out episodes per task for the image policy: layout seed 0 (img_d05.json, img_d24.json) and
seed 1 (img_seed1.json), 10 episodes per task each, merged per strategy and d. Success: over all
episodes; steps: mean over the successful episodes; switch / inside change: the two runs' means
weighted by episodes (each run's mean is over its own ticks). Writes table20.txt."""
import ast
import json
from pathlib import Path

here = Path(__file__).parent
runs = {"seed 0": [here / "img_d05.json", here / "img_d24.json"], "seed 1": [here / "img_seed1.json"]}
rows: dict = {}
for files in runs.values():
    for f in files:
        for key, r in json.loads(f.read_text())["results"].items():
            rows.setdefault(key, []).append(r)


def tasks(r):
    t = r["tasks"]
    return ast.literal_eval(t) if isinstance(t, str) else t


lines = [f"{'strategy':<13}{'d':>3}{'eps':>5}{'success':>9}{'steps':>8}{'sw/in':>7}  per task below 1.0",
         "-" * 90]
for key in sorted(rows, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
    rs = rows[key]
    n = sum(r["episodes"] for r in rs)
    succ = sum(r["success_rate"] * r["episodes"] for r in rs)
    steps = sum(r["mean_steps_success"] * r["success_rate"] * r["episodes"] for r in rs) / succ
    sw = sum(r["switch_change"] * r["episodes"] for r in rs) / n
    ins = sum(r["inside_change"] * r["episodes"] for r in rs) / n
    per = {}
    for r in rs:
        for t, v in tasks(r).items():
            a = per.setdefault(t, [0.0, 0])
            a[0] += v["success_rate"] * v["episodes"]
            a[1] += v["episodes"]
    low = ", ".join(f"{t.removesuffix('-v3')} {s / e:.2f}" for t, (s, e) in per.items() if s < e)
    s, d = key.split("@")
    lines.append(f"{s:<13}{d:>3}{n:>5}{succ / n:>9.3f}{steps:>8.1f}{sw / ins:>7.2f}  {low}")
out = "\n".join(lines)
print(out)
(here / "table20.txt").write_text(out + "\n")
