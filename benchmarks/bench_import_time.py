"""Start-up cost: `import hf_hybrid_attn`, `hf-hybrid info DIR` and the imports they are compared with.

Each measurement is a fresh interpreter (`python -c ...` or the CLI through `python -m`), timed
from the parent with time.perf_counter around the whole process, so interpreter start-up is
included, as a user sees it; the median of --repeats runs is reported, with min and max. Also
records which of torch / transformers each command ended up importing.

    python benchmarks/bench_import_time.py [--repeats 7] [--out benchmarks/results]

Writes import_time_<device>.{json,md} (device = "cpu": no accelerator is involved). Run it on a
quiet machine: other jobs on the cores inflate every number alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_generate import machine_name  # noqa: E402

PROBE = "import json, sys; print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers')}))"

CASES = {
    "python -c pass (interpreter start-up)": ["-c", "pass"],
    "import torch, transformers": ["-c", "import torch, transformers; " + PROBE],
    "import hf_hybrid_attn": ["-c", "import hf_hybrid_attn; " + PROBE],
    "import hf_hybrid_attn; import transformers (registration runs)": [
        "-c", "import hf_hybrid_attn, transformers; assert hf_hybrid_attn.registration.is_registered(); " + PROBE],
    "from hf_hybrid_attn import convert (the core, registered)": ["-c", "from hf_hybrid_attn import convert; " + PROBE],
    "hf-hybrid info DIR": None,  # filled in main(): needs a checkpoint folder
}


def run_once(args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{args}: exit {out.returncode}: {out.stderr[-2000:]}")
    loaded = {}
    for line in reversed(out.stdout.strip().splitlines()):
        try:
            loaded = json.loads(line)
            break
        except ValueError:
            continue
    return dt, loaded if isinstance(loaded, dict) and "torch" in loaded else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "hybrid_llama", "hybrid": {"window": 64, "feature_map": "hedgehog"}}, f)
        cases = dict(CASES)
        cases["hf-hybrid info DIR"] = ["-c", "import sys, io, contextlib\nfrom hf_hybrid_attn.cli import main\n"
                                       f"with contextlib.redirect_stdout(io.StringIO()): main(['info', {d!r}])\n" + PROBE]
        results = []
        for name, cmd in cases.items():
            times, loaded = [], {}
            run_once(cmd)  # warm the file cache
            for _ in range(args.repeats):
                dt, loaded = run_once(cmd)
                times.append(dt)
            results.append({"what": name, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                            "max_s": round(max(times), 3), "imports": loaded})
            print(f"{name:<62} {statistics.median(times):6.2f} s  {loaded}", flush=True)
    import importlib.metadata as md

    import torch

    res = {"machine": machine_name(torch.device("cpu")), "python": sys.version.split()[0],
           "versions": {p: md.version(p) for p in ("torch", "transformers")},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats,
           "method": "fresh interpreter per run, wall time of the whole process from the parent; median of repeats",
           "results": results}
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "import_time_cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Start-up cost ({res['machine']})", "",
             f"{res['date']}, commit {res.get('commit', '?')}, Python {res['python']}, torch {res['versions']['torch']}, "
             f"transformers {res['versions']['transformers']}. {res['method']} ({args.repeats}).", "",
             "| command | median s | min–max s | loads torch | loads transformers |", "|---|---|---|---|---|"]
    for r in results:
        imp = r["imports"]
        lines.append(f"| {r['what']} | {r['median_s']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | "
                     f"{imp.get('torch', '–')} | {imp.get('transformers', '–')} |")
    (out / "import_time_cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
