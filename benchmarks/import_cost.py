"""What `import engagerec.model` costs: seconds, peak RSS and the heavy packages it loads.

    .venv/bin/python benchmarks/import_cost.py                       # this checkout, this venv
    .venv/bin/python benchmarks/import_cost.py --plugin OTHER/plugin # another checkout's package

Each measurement is a fresh interpreter; the median of --repeats is printed with the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = """
import json, resource, sys, time
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
extras = ("duckdb", "pandas", "pyarrow", "sklearn", "scipy", "matplotlib", "tensorboard")
heavy = [m for m in extras if m in sys.modules]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "peak_rss_mib": peak, "heavy": heavy}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--module", default="engagerec.model")
    parser.add_argument("--plugin", help="the plugin/ folder to import from (default: the installed package)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.plugin:
        env["PYTHONPATH"] = args.plugin
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [args.python, "-c", PROBE.format(module=args.module)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from engagerec.machine import cpu_name

    print(
        json.dumps(
            {
                "module": args.module,
                "plugin": args.plugin or "installed",
                "cpu": cpu_name(),
                "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
                "peak_rss_mib_median": round(statistics.median(r["peak_rss_mib"] for r in runs)),
                "heavy_packages_loaded": runs[0]["heavy"],
            }
        )
    )


if __name__ == "__main__":
    main()
