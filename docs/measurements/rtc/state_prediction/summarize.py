"""Tables of the predict_state runs in this folder against the same runs without it (run from the
repository root):

    python docs/measurements/rtc/state_prediction/summarize.py

``a.json``/``b.json`` (this folder): every strategy x d with predict_state on (the node's default).
``../ep20/{a,b,d_hold1}.json``: the same command, episodes and seeds without a state model (written before
predict_state existed; their d = 0 rows are identical to this folder's, as they must be: with d = 0 the
state is never rolled forward). Writes summary.json and table.txt here."""
import json
from pathlib import Path

from mode_ros.sim.evaluate import format_delay_table

here = Path(__file__).resolve().parent
ep20 = here.parent / "ep20"
order = ["replan", "rtc_replace", "rtc_guidance", "ensemble"]


def rows(files, label):
    out = {}
    for f in files:
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        hold = d["config"].get("rtc_hold_rows")
        for key, r in d["results"].items():
            if r["strategy"].startswith("rtc_") and r["d"] == 5 and f.parent == ep20 and hold != 1:
                continue          # ep20's d = 5 rtc rows with other rtc_hold_rows than today's default 1
            out[f"{r['strategy']}@{r['d']}"] = {**r, "file": f"{f.parent.name}/{f.name}", "run": label}
    return out


on = rows([here / "a.json", here / "b.json"], "predict_state on")
off = rows([ep20 / "a.json", ep20 / "b.json", ep20 / "d_hold1.json"], "no state model")


def rank(key):
    s, d = key.split("@")
    return order.index(s), int(d)


def task(r, name):
    t = r["tasks"].get(name + "-v3")
    return "-" if t is None else f"{t['success_rate']:.2f}"


lines = [f"{'strategy':13s} {'d':>2s}  {'success off -> on':>17s}  {'steps off -> on':>15s}  "
         f"{'sw/in off -> on':>15s}  {'peg off -> on':>13s}  {'door off -> on':>14s}"]
lines.append("-" * len(lines[0]))
for key in sorted(set(on) | set(off), key=rank):
    a, b = off.get(key), on.get(key)

    def pair(f, fmt):
        return " -> ".join("-" if r is None or r.get(f) is None else format(r[f], fmt) for r in (a, b))
    lines.append(f"{key.split('@')[0]:13s} {int(key.split('@')[1]):2d}  {pair('success_rate', '.3f'):>17s}  "
                 f"{pair('mean_steps_success', '.1f'):>15s}  {pair('switch_over_inside', '.2f'):>15s}  "
                 f"{' -> '.join(task(r, 'peg-insert-side') if r else '-' for r in (a, b)):>13s}  "
                 f"{' -> '.join(task(r, 'door-open') if r else '-' for r in (a, b)):>14s}")
report = {"on": dict(sorted(on.items(), key=lambda kv: rank(kv[0]))),
          "off": dict(sorted(off.items(), key=lambda kv: rank(kv[0])))}
(here / "summary.json").write_text(json.dumps(report, indent=1))
text = ("predict_state on (a.json, b.json):\n" + format_delay_table({"results": report["on"]}) +
        "\n\nagainst the same episodes without a state model (../ep20, rtc_hold_rows 1):\n" + "\n".join(lines) + "\n")
img_on = rows([here / "images" / "img_on.json"], "predict_state on")
img_off = rows([here / "images" / "img_off.json"], "predict_state false")
if img_on:
    head = (f"{'strategy':17s} {'d':>2s}  {'success':>7s}  {'steps':>6s}  {'sw/in':>5s}  per task below 1.0")
    img = [head, "-" * 90]
    for label, src in (("", img_on), (" (off)", img_off)):
        for key, r in sorted(src.items(), key=lambda kv: rank(kv[0])):
            low = ", ".join(f"{t.removesuffix('-v3')} {v['success_rate']:.2f}" for t, v in r["tasks"].items()
                            if v["success_rate"] < 1)
            part = "" if r.get("complete", True) else f"  (only {len(r['tasks'])} tasks)"
            img.append(f"{r['strategy'] + label:17s} {r['d']:2d}  {r['success_rate']:7.3f}  "
                       f"{r['mean_steps_success'] or float('nan'):6.1f}  {r['switch_over_inside'] or float('nan'):5.2f}  {low}{part}")
    text += "\nimage policy (images/img_on.json, images/img_off.json; 120 episodes per row):\n" + "\n".join(img) + "\n"
(here / "table.txt").write_text(text)
print(text)
