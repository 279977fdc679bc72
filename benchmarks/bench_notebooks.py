"""Usage:
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_notebooks.py [--only 01 03] [--json FILE]

How long the teaching notebooks take as tests/test_notebooks.py runs them: smoke mode (NOTEBOOK_SMOKE=1), the
shipped weights, one torch thread, each in a fresh kernel. For each notebook it prints the wall seconds and the CPU
seconds of its kernel, imports included. The CPU seconds come from one extra cell, appended after the notebook's
own, that reads the kernel's resource usage. With one thread they are about the wall time on an idle machine, and
they hold steady on a loaded one, where the wall time does not. Nothing is asserted: the test checks behaviour
only, and this script is where the time is looked at.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "notebooks"))
from common import machine, markdown_table, write_json  # noqa: E402

# Appended to each notebook: user + system CPU seconds of the kernel process, all its threads, since it started.
CPU_CELL = ("import json, resource\n"
            "r = resource.getrusage(resource.RUSAGE_SELF)\n"
            "print(json.dumps({'cpu_s': r.ru_utime + r.ru_stime}))")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="notebooks whose name starts with these, e.g. 01 03")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    import build
    import nbformat
    names = [n for n in build.NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only)]
    if not names:
        p.error(f"--only {args.only}: no notebook matches; expected prefixes of {', '.join(build.NOTEBOOKS)}")
    # The kernels inherit this environment. The test's settings: the shipped weights (no WUERSTCHEN_RUN), and a
    # throwaway training folder, so that a notebook that trains after all does not leave models in runs/.
    os.environ.pop("WUERSTCHEN_RUN", None)
    os.environ.update(NOTEBOOK_SMOKE="1", NOTEBOOK_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NOTEBOOK_TRAIN_DIR"] = tmp
        for name in names:
            nb = build.make(name)
            nb.cells.append(nbformat.v4.new_code_cell(CPU_CELL))
            start = time.perf_counter()
            build.execute(nb)
            wall = time.perf_counter() - start
            cpu = json.loads(nb.cells[-1].outputs[-1]["text"])["cpu_s"]
            rows.append({"notebook": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)})
            print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    total = {"notebook": "total", "wall_s": round(sum(r["wall_s"] for r in rows), 1),
             "cpu_s": round(sum(r["cpu_s"] for r in rows), 1)}
    print(f"\n{machine()}, {os.cpu_count()} CPUs, smoke mode, 1 torch thread\n")
    print(markdown_table(["notebook", "wall s", "CPU s"], [[r["notebook"], r["wall_s"], r["cpu_s"]]
                                                           for r in rows + [total]]))
    if args.json:
        write_json(args.json, {"machine": machine(), "cpus": os.cpu_count(), "smoke": True, "threads": 1,
                               "notebooks": rows, "total": total})


if __name__ == "__main__":
    main()
