"""Table of the run4 metaworld bench JSONs: per run, each path's median / p90 ms per chunk, the onnx
thread choice, and the paired speed-up of onnx over the fastest PyTorch path (median of per-round ratios)."""
import json
import statistics
import sys
from pathlib import Path

here = Path(__file__).parent
lines = ["| threads | run | cached | fused | compiled | onnx-plain | onnx | onnx threads (calibration ms) | "
         "onnx ÷ fastest PyTorch, paired median (p10) | ratio of medians |", "|---" * 10 + "|"]
ratios = {}
for f in sorted(here.glob("mw_t*_r*.json")):
    rows = {r["path"]: r for r in json.loads(f.read_text())["rows"]}
    t = f.stem.split("_")[1][1:]
    cell = lambda p: f"{rows[p]['median_ms']:.2f} / {rows[p]['p90_ms']:.2f}" if p in rows else "–"  # noqa: E731
    o = rows["onnx"]
    th = o.get("onnx_threads", {})
    best = min((r for p, r in rows.items() if not p.startswith("onnx")), key=lambda r: r["median_ms"])
    ps = o["paired_speedup_vs"]
    ratios.setdefault(t, []).append(ps["median"])
    lines.append(f"| {t} | `{f.stem}` | {cell('cached')} | {cell('fused')} | {cell('compiled')} | {cell('onnx-plain')} | "
                 f"**{cell('onnx')}** | {th.get('chosen')} ({th.get('median_ms')}) | **{ps['median']:.2f}×** "
                 f"({ps['p10']:.2f}) vs {ps['path']} | {best['median_ms'] / o['median_ms']:.2f}× |")
for t, v in sorted(ratios.items()):
    lines.append(f"\n{t} thread(s): {len(v)} runs, paired speed-up min {min(v):.2f}×, median "
                 f"{statistics.median(v):.2f}×, max {max(v):.2f}×")
out = "\n".join(lines)
print(out)
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(out + "\n")
