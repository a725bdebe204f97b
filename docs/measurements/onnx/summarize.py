"""Tables of this folder from the raw outputs (run from the repository root):

    python docs/measurements/onnx/summarize.py latency   bench_t1/bench.json bench_t2/bench.json ...
    python docs/measurements/onnx/summarize.py success   EVAL_DIR   (s{steps}_{task}.json of `mode-ros sim eval`)

latency: per (threads, preset), ms per chunk median / p90 of every path and each path's ratio to
onnxruntime, measured in the same run. success: per step count, held-out success per task, mean, and
episodes. Prints a markdown table and writes the rows as JSON next to the table (``--json FILE``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def latency(files: list[str]) -> tuple[list[dict], str]:
    rows = []
    for f in files:
        d = json.loads(Path(f).read_text())
        for r in d["rows"]:
            rows.append({"threads": d["meta"]["threads"], "preset": r["preset"], "steps": r["steps"],
                         "path": r["path"], "median_ms": r["median_ms"], "p90_ms": r["p90_ms"],
                         "max_abs_diff_vs_fp32": r["max_abs_diff_vs_fp32"], "export_s": r.get("export_s"),
                         "onnx_file_MB": r.get("onnx_file_MB")})
    lines = ["| threads | preset | steps | path | median ms | p90 ms | onnx speed-up | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        onnx = [o for o in rows if (o["threads"], o["preset"], o["steps"], o["path"]) ==
                (r["threads"], r["preset"], r["steps"], "onnx")]
        ratio = f"{r['median_ms'] / onnx[0]['median_ms']:.2f}x" if onnx and r["path"] != "onnx" else "-"
        lines.append(f"| {r['threads']} | {r['preset']} | {r['steps']} | {r['path']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {ratio} | {r['max_abs_diff_vs_fp32']:.1e} |")
    return rows, "\n".join(lines)


def success(folder: str) -> tuple[list[dict], str]:
    per = {}
    for f in sorted(Path(folder).glob("s*_*.json")):
        steps = int(f.stem.split("_")[0][1:])
        d = json.loads(f.read_text())
        for task, t in d["tasks"].items():
            per.setdefault(steps, {})[task] = t
    rows, lines = [], ["| steps | tasks | episodes/task | mean success | per task | ms per policy call (batch = episodes) |",
                       "|---|---|---|---|---|---|"]
    for steps in sorted(per, reverse=True):
        ts = per[steps]
        mean = sum(t["success_rate"] for t in ts.values()) / len(ts)
        ms = sum(t["policy_seconds"] for t in ts.values()) / sum(t["policy_calls"] for t in ts.values()) * 1e3
        rows.append({"steps": steps, "tasks": {k: t["success_rate"] for k, t in ts.items()}, "mean_success": mean,
                     "episodes": sorted({t["episodes"] for t in ts.values()}), "ms_per_call": ms})
        detail = ", ".join(f"{k.replace('-v3', '')} {t['success_rate']:.2f}" for k, t in ts.items())
        lines.append(f"| {steps} | {len(ts)} | {rows[-1]['episodes']} | {mean:.3f} | {detail} | {ms:.1f} |")
    return rows, "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    rows, text = latency(args[1:]) if args[0] == "latency" else success(args[1])
    print(text)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
