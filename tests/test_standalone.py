"""Each stage file reads alone: it imports only the standard library, torch, safetensors and the two shared modules
(schedule.py, and checkpoints.py for safe reading and strict loading), and the blocks it shares with another stage
file are identical copies, not drifting near-copies."""
import ast
import inspect
import sys

import pytest

import stage_b
import stage_c
from conftest import ROOT

ALLOWED = {"torch", "safetensors", "schedule", "checkpoints"}


@pytest.mark.parametrize("name", ["stage_a.py", "stage_b.py", "stage_c.py", "schedule.py", "checkpoints.py"])
def test_stage_files_import_only_stdlib_torch_safetensors_and_the_shared_modules(name):
    tree = ast.parse((ROOT / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    allowed = ALLOWED | set(sys.stdlib_module_names)
    if name == "checkpoints.py":          # load_stage rebuilds any stage, importing them when called (see below)
        allowed |= {"stage_a", "stage_b", "stage_c"}
    assert imported <= allowed, f"{name} imports {sorted(imported - allowed)}"


def test_checkpoints_imports_the_stage_files_only_inside_a_function():
    """The stage files import checkpoints.py, so a stage file imported at its top would be a circular import."""
    tree = ast.parse((ROOT / "checkpoints.py").read_text())
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names} | \
        {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not top & {"stage_a", "stage_b", "stage_c"}


SHARED_BY_B_AND_C = ["LayerNorm2d", "GlobalResponseNorm", "TimestepBlock", "Attention", "AttnBlock",
                     "official_to_diffusers"]


@pytest.mark.parametrize("name", SHARED_BY_B_AND_C)
def test_blocks_copied_between_stage_b_and_c_are_identical(name):
    assert inspect.getsource(getattr(stage_b, name)) == inspect.getsource(getattr(stage_c, name))
