"""The teaching notebooks (notebooks/, issues 5 and 14).

- Each notebook is a jupytext pair, notebooks/NN_name.py and NN_name.ipynb, and the two hold the same cells: an
  edit made on one side only fails with one line saying which `jupytext --sync` pairs them again, and that command
  carries an edit across from either side.
- Every notebook runs headlessly on the CPU in smoke mode (NOTEBOOK_SMOKE=1: fewer images) on the shipped weights,
  as a reader's does, with no failing cell; WUERSTCHEN_RUN=train trains instead.
- The committed notebooks carry their outputs (pictures and tables), were run top to bottom outside smoke mode,
  and are each under build.MAX_BYTES.
- The kernel is the Python running the tests (.venv's), with nothing registered beforehand.
Nothing here is timed: a slow machine is not wrong behaviour. benchmarks/bench_notebooks.py measures the notebooks.
"""
import base64
import io
import os
import re
import shutil
import sys

import pytest

from conftest import ROOT

try:
    import jupytext  # noqa: F401
    import nbformat
    from nbclient.exceptions import CellExecutionError
except ImportError:                       # CI installs requirements-test.txt, so there a missing package fails
    if os.environ.get("CI"):
        raise
    pytest.skip("the notebook tooling is not installed: bash scripts/setup.sh requirements-test.txt",
                allow_module_level=True)

sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402

# A hang guard, not a budget: the slowest cell takes seconds in smoke mode, minutes only on a badly loaded machine.
CELL_TIMEOUT_S = 900


def test_the_notebooks_are_the_ones_the_readme_lists():
    listed = re.findall(r"\]\((\d\d_\w+\.ipynb)\)", (ROOT / "notebooks" / "README.md").read_text())
    assert len(build.NOTEBOOKS) == 4 and set(listed) == set(build.NOTEBOOKS), (listed, build.NOTEBOOKS)


@pytest.mark.parametrize("name", list(build.NOTEBOOKS))
def test_notebook_and_its_script_hold_the_same_cells(name):
    problem = build.pair_mismatch(ROOT / "notebooks" / name)
    if problem:
        pytest.fail(problem, pytrace=False)          # the one line, without a traceback around it


def _sync(path):
    """`jupytext --sync path`, in this process; trust is checked against a throwaway database, not the user's."""
    from jupytext.cli import jupytext as jupytext_cli
    from nbformat.sign import NotebookNotary
    assert jupytext_cli(["--sync", "--quiet", str(path)], notary=NotebookNotary(db_file=":memory:", secret=b"t")) == 0


def _saved_after(path, other):
    """Mark `path` as saved 2 s after `other`: jupytext --sync takes the cells of the file saved last."""
    later = other.stat().st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))


def test_sync_carries_an_edit_across_from_either_side(tmp_path):
    for file in ("01_stage_a.py", "01_stage_a.ipynb", "jupytext.toml"):      # the pairing lives in jupytext.toml
        shutil.copy2(ROOT / "notebooks" / file, tmp_path / file)
    py, ipynb = tmp_path / "01_stage_a.py", tmp_path / "01_stage_a.ipynb"
    pictures = len(build.images(nbformat.read(ipynb, as_version=4)))
    assert build.pair_mismatch(py) is None

    # A markdown edit in the script alone is caught, in one line naming the notebook and the command...
    text = py.read_text()
    py.write_text(text.replace("# # 1 · Stage A: the f4 VQGAN\n", "# # 1 · Stage A: the f4 VQGAN, edited\n", 1))
    _saved_after(py, ipynb)
    problem = build.pair_mismatch(ipynb)
    assert problem is not None and "\n" not in problem, problem
    assert "01_stage_a.ipynb" in problem and f"jupytext --sync {py.resolve()}" in problem, problem
    # ... and syncing brings it into the notebook, whose outputs stay: the code cells did not change.
    _sync(py)
    assert build.pair_mismatch(ipynb) is None
    nb = nbformat.read(ipynb, as_version=4)
    assert nb.cells[0].source.startswith("# 1 · Stage A: the f4 VQGAN, edited\n")
    assert len(build.images(nb)) == pictures

    # The other way: the notebook edited and saved in Jupyter, the script left behind.
    nb.cells[0].source += "\n\nA line added in Jupyter."
    nbformat.write(nb, ipynb)
    _saved_after(ipynb, py)
    problem = build.pair_mismatch(py)
    assert problem is not None and "\n" not in problem and "jupytext --sync" in problem, problem
    _sync(ipynb)
    assert build.pair_mismatch(py) is None
    assert "# A line added in Jupyter.\n" in py.read_text()


def test_build_reads_the_script_but_never_overwrites_newer_notebook_edits(tmp_path, monkeypatch, capsys):
    for file in ("01_stage_a.py", "01_stage_a.ipynb"):
        shutil.copy2(ROOT / "notebooks" / file, tmp_path / file)
    py, ipynb = tmp_path / "01_stage_a.py", tmp_path / "01_stage_a.ipynb"
    monkeypatch.setattr(build, "HERE", tmp_path)
    nb = nbformat.read(ipynb, as_version=4)
    nb.cells[0].source += "\n\nA line added in Jupyter."
    nbformat.write(nb, ipynb)
    _saved_after(ipynb, py)
    with pytest.raises(SystemExit):
        build.main(["--only", "01", "--no-execute", "--out", str(tmp_path)])
    assert "jupytext --sync" in capsys.readouterr().err
    assert "A line added in Jupyter." in ipynb.read_text()                # left as it was
    _saved_after(py, ipynb)                                               # the script saved last: it is the source
    build.main(["--only", "01", "--no-execute", "--out", str(tmp_path)])
    assert build.pair_mismatch(py) is None and "A line added in Jupyter." not in ipynb.read_text()


def test_notebooks_run_in_smoke_mode(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.delenv("WUERSTCHEN_RUN", raising=False)              # the shipped weights, as for a reader
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NOTEBOOK_TRAIN_DIR", str(run))
    monkeypatch.setenv("NOTEBOOK_THREADS", "1")                       # the CPU is shared with the other tests
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    for name in build.NOTEBOOKS:
        nb = build.make(name)
        try:
            build.execute(nb, timeout=CELL_TIMEOUT_S)
        except CellExecutionError as e:
            pytest.fail(f"notebooks/{name}: a cell failed\n{e}", pytrace=False)
        assert len(build.images(nb)) >= 3, f"{name} showed fewer than 3 pictures"
    assert not run.exists(), "a notebook trained models although the shipped weights were there"


def test_train_mode_trains_tiny_models_once(tmp_path, monkeypatch, capsys):
    import torch
    threads = torch.get_num_threads()
    import nbtools                        # it sets one torch thread for the notebooks: not for the other tests
    torch.set_num_threads(threads)
    monkeypatch.setenv("WUERSTCHEN_RUN", "train")
    monkeypatch.setattr(nbtools, "SMOKE", True)
    monkeypatch.setenv("NOTEBOOK_TRAIN_DIR", str(tmp_path))
    assert nbtools.prepare_run("a") == tmp_path.resolve()
    assert "trained stage A: 3 steps" in capsys.readouterr().out and (tmp_path / "stage_a.pt").is_file()
    nbtools.prepare_run("a")                                          # found there: reused, not trained again
    assert "trained earlier" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(build.NOTEBOOKS))
def test_committed_notebook_has_outputs_and_is_small(name):
    path = ROOT / "notebooks" / name
    assert path.exists(), f"{path} is missing; run bash scripts/notebooks.sh"
    assert path.stat().st_size <= build.MAX_BYTES, f"{name}: {path.stat().st_size:,} bytes > {build.MAX_BYTES:,}"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)                 # its cells are its .py's: test_notebook_and_its_script_hold_the_same_cells
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{name}: not run top to bottom; run bash scripts/notebooks.sh --only {name[:2]}"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name} holds an error"
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], f"{name} holds stderr"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "smoke mode" not in text, f"{name} was built in smoke mode (untrained models)"
    pictures = len(build.images(nb))
    assert pictures >= 3, f"{name}: {pictures} pictures"
    assert any("text/markdown" in o.get("data", {}) for o in outputs), f"{name}: no table"


def test_kernel_is_this_python():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    build.execute(nb, timeout=CELL_TIMEOUT_S)
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable


def test_shrink_downsizes_and_reencodes():
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    blocks = Image.fromarray(rng.integers(0, 256, (20, 120, 3), dtype=np.uint8)).resize((1800, 300), Image.BILINEAR)
    noisy = Image.fromarray((np.asarray(blocks) + rng.integers(-8, 9, (300, 1800, 3))).clip(0, 255).astype(np.uint8))
    plot = Image.new("RGB", (400, 300), "white")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("")])
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={"image/png": _png(image)})
                           for image in (noisy, plot)]
    build.shrink(nb)
    (mime_a, data_a), (mime_b, data_b) = build.images(nb)
    assert mime_a == "image/jpeg" and Image.open(io.BytesIO(data_a)).width == build.MAX_IMAGE_WIDTH
    assert mime_b == "image/png" and Image.open(io.BytesIO(data_b)).convert("RGB").tobytes() == plot.tobytes()


def test_a_given_run_must_hold_the_stages(tmp_path, monkeypatch):
    import torch
    threads = torch.get_num_threads()
    import nbtools                        # it sets one torch thread for the notebooks: not for the other tests
    torch.set_num_threads(threads)
    monkeypatch.setenv("WUERSTCHEN_RUN", str(tmp_path))
    (tmp_path / "stage_a.pt").write_bytes(b"")
    assert nbtools.prepare_run("a") == tmp_path.resolve()             # given: loaded, never trained
    with pytest.raises(FileNotFoundError, match="no stage_b.pt, stage_c.pt"):
        nbtools.prepare_run("abc")


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
