"""Usage:
    bash scripts/notebooks.sh [--only 01 03] [--no-execute]          # sets up .venv, then runs this script
    .venv/bin/python notebooks/build.py [--only 01 03] [--no-execute] [--out DIR]
    WUERSTCHEN_RUN=runs/tiny bash scripts/notebooks.sh               # the checkpoints `bash scripts/demo.sh` wrote

Runs the teaching notebooks and saves them with their outputs. Each notebook is a jupytext pair in this folder,
NN_name.py (percent format) and NN_name.ipynb, paired by jupytext.toml; either can be edited, and
`jupytext --sync` copies the cells of the one saved last into the other. This script authors nothing: it reads the
cells from the .py, runs them top to bottom with nbclient in a fresh kernel (in notebooks/, as Jupyter would),
re-encodes the pictures, downsized where wide, so that each file stays under MAX_BYTES, and writes the .ipynb.
It refuses to run a notebook whose .ipynb holds edits that are newer than its .py (they would be overwritten).
The kernel is the Python that runs this script (.venv's), through a kernelspec written to a temporary folder:
nothing needs registering, and a `python3` kernelspec elsewhere on the machine cannot take its place.
"""
import argparse
import base64
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_BYTES = 300_000          # per committed notebook
MAX_IMAGE_WIDTH = 900        # px; wider pictures are downsized
KERNEL = "wuerstchen-notebooks"
CELL_TIMEOUT = 1800          # s per cell: training a stage (WUERSTCHEN_RUN=train) takes a few minutes
# The notebooks are the NN_*.py / NN_*.ipynb pairs here; a pair missing one half is still listed, so that the
# pair check (pair_mismatch, tests/test_notebooks.py) reports the missing half instead of skipping the notebook.
NOTEBOOKS = tuple(sorted({p.stem + ".ipynb" for p in HERE.glob("[0-9][0-9]_*") if p.suffix in (".py", ".ipynb")}))


def _shown(path: Path) -> str:
    """A path as messages print it: relative to the repository when inside it, so it can be pasted there."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _read_script(path: Path):
    """The notebook a .py holds, cells only (percent format, as `jupytext --sync` reads it)."""
    return jupytext.read(path, fmt="py:percent")


def make(name: str):
    """The notebook `name` (e.g. "01_stage_a.ipynb") as its .py holds it, without outputs."""
    nb = _read_script(HERE / Path(name).with_suffix(".py"))
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"        # stable ids: re-running gives small diffs
    return nb


def pair_mismatch(path) -> str | None:
    """None when a notebook's .py and .ipynb (`path` is either) hold the same cells, type and source; otherwise one
    line that names the notebook and says how to pair the two again."""
    path = Path(path)
    py, ipynb = path.with_suffix(".py"), path.with_suffix(".ipynb")
    for missing, other in ((py, ipynb), (ipynb, py)):
        if not missing.is_file():
            if not other.is_file():
                return f"{_shown(path)}: neither {py.name} nor {ipynb.name} exists"
            return f"{_shown(missing)} is missing: run `jupytext --sync {_shown(other)}` to write it from its pair"
    try:
        in_py = [(c.cell_type, c.source) for c in _read_script(py).cells]
        in_ipynb = [(c.cell_type, c.source) for c in nbformat.read(ipynb, as_version=4).cells]
    except Exception as e:            # e.g. a merge conflict left in the JSON: still one line, naming the file
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{_shown(ipynb)} or its .py cannot be read ({type(e).__name__}: {first})"
    if in_py == in_ipynb:
        return None
    at = next((i for i, (a, b) in enumerate(zip(in_py, in_ipynb)) if a != b), min(len(in_py), len(in_ipynb)))
    counts = "" if len(in_py) == len(in_ipynb) else f" ({len(in_py)} cells in the .py, {len(in_ipynb)} in the .ipynb)"
    return (f"{_shown(ipynb)} and {py.name} differ at cell {at + 1}{counts}: run `jupytext --sync {_shown(py)}` "
            f"(or on the .ipynb: the file saved last wins), then bash scripts/notebooks.sh if code changed")


@contextlib.contextmanager
def kernel_manager():
    """A kernel manager for this very Python, from a kernelspec in a temporary folder (nothing is registered)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}))
        yield KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def execute(nb, timeout: int = CELL_TIMEOUT):
    """Run every cell in a fresh kernel, in notebooks/ as Jupyter would, and stop the kernel. Raises nbclient's
    CellExecutionError (with the cell and its traceback) on the first failing cell; `timeout` is per cell."""
    from nbclient import NotebookClient
    with kernel_manager() as km:
        try:
            NotebookClient(nb, km=km, timeout=timeout, record_timing=False, allow_errors=False,
                           resources={"metadata": {"path": str(HERE)}}).execute()
        finally:
            # nbclient leaves a kernel it did not create running until this process exits: with several notebooks
            # run in one process (the tests), each would keep its models in memory. Stop it here.
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    for cell in nb.cells:
        # The kernel flushes stdout on a timer, so one print can arrive in pieces, split differently on each run.
        # Adjacent pieces of one stream are joined (Jupyter shows them joined), which keeps re-runs' diffs small.
        joined = []
        for output in cell.get("outputs", []):
            last = joined[-1] if joined else None
            if output.output_type == "stream" and last and last.output_type == "stream" and last.name == output.name:
                last.text += output.text
            else:
                joined.append(output)
        if "outputs" in cell:
            cell.outputs = joined
    return nb


def shrink(nb):
    """Re-encode every picture among the outputs, downsized to MAX_IMAGE_WIDTH where wider. Plots become palette
    PNGs where 256 colours render them all but invisibly (mean error ≤ 0.25 of 255, 99.9% of pixels within 16);
    pictures of samples, where PNG compresses badly, become JPEGs (quality 85, full-resolution colour) when that
    saves 40% or more; everything else stays a PNG."""
    import numpy as np
    from PIL import Image
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGB")
            if image.width > MAX_IMAGE_WIDTH:
                image = image.resize((MAX_IMAGE_WIDTH, round(image.height * MAX_IMAGE_WIDTH / image.width)),
                                     Image.LANCZOS)
            palette = image.quantize(256, method=Image.MEDIANCUT, dither=Image.Dither.NONE)
            error = np.abs(np.asarray(palette.convert("RGB"), np.int16) - np.asarray(image, np.int16)).max(-1)
            faithful = error.mean() <= 0.25 and np.percentile(error, 99.9) <= 16
            buffer = io.BytesIO()
            (palette if faithful else image).save(buffer, format="PNG", optimize=True)
            mime, encoded = "image/png", buffer.getvalue()
            if not faithful and len(encoded) > 20_000:
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=85, subsampling=0, optimize=True)
                if jpeg.tell() <= 0.6 * len(encoded):
                    mime, encoded = "image/jpeg", jpeg.getvalue()
            del data["image/png"]
            data[mime] = base64.b64encode(encoded).decode("ascii") + "\n"
            output.setdefault("metadata", {}).pop("image/png", None)
    return nb


def images(nb) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of every picture among the outputs."""
    return [(mime, base64.b64decode(output["data"][mime])) for cell in nb.cells for output in cell.get("outputs", [])
            for mime in ("image/png", "image/jpeg") if mime in output.get("data", {})]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="notebooks whose name starts with these, e.g. 01 03")
    p.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    p.add_argument("--out", default=str(HERE), help="folder to write them to (default: notebooks/)")
    args = p.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only)]
    if not names:
        p.error(f"--only {args.only}: no notebook matches; expected prefixes of {', '.join(NOTEBOOKS)}")
    for name in names:
        # The cells come from the .py. Edits made in the .ipynb after it would be lost: stop before running anything.
        ipynb, py = HERE / name, HERE / Path(name).with_suffix(".py")
        problem = pair_mismatch(ipynb)
        if problem and (not py.is_file() or (ipynb.is_file() and ipynb.stat().st_mtime > py.stat().st_mtime)):
            p.error(problem)
    if os.environ.get("WUERSTCHEN_RUN", "") not in ("", "train"):   # the kernel runs in notebooks/: make it absolute
        os.environ["WUERSTCHEN_RUN"] = str(Path(os.environ["WUERSTCHEN_RUN"]).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        nb, start = make(name), time.perf_counter()
        if not args.no_execute:
            print(f"running {name} ...", flush=True)
            execute(nb)
            shrink(nb)
        nbformat.validate(nb)
        # Paired through jupytext.toml, not through metadata: the .ipynb written here is newer than its .py and holds
        # the same cells, so `jupytext --sync` finds nothing to change on either side.
        nbformat.write(nb, out / name)
        size = (out / name).stat().st_size
        print(f"wrote {out / name}: {size / 1000:.0f} KB" + ("" if args.no_execute else
                                                              f", ran in {time.perf_counter() - start:.0f} s"))
        if size > MAX_BYTES:
            print(f"warning: {name} is over {MAX_BYTES / 1000:.0f} KB; tests/test_notebooks.py will fail",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
