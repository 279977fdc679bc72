"""Each stage file reads alone: it imports only the standard library, torch, safetensors and the schedule module,
and the blocks it shares with another stage file are identical copies, not drifting near-copies."""
import ast
import inspect
import sys

import pytest

import stage_a
import stage_b
import stage_c
from conftest import ROOT

ALLOWED = {"torch", "safetensors", "schedule"}


@pytest.mark.parametrize("name", ["stage_a.py", "stage_b.py", "stage_c.py", "schedule.py"])
def test_stage_files_import_only_stdlib_torch_safetensors_and_schedule(name):
    tree = ast.parse((ROOT / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    allowed = ALLOWED | set(sys.stdlib_module_names)
    assert imported <= allowed, f"{name} imports {sorted(imported - allowed)}"


SHARED_BY_B_AND_C = ["LayerNorm2d", "GlobalResponseNorm", "TimestepBlock", "Attention", "AttnBlock",
                     "official_to_diffusers"]
SHARED_BY_ALL = ["CheckpointError", "_read_checkpoint", "_read_diffusers_folder", "_load_strict"]


@pytest.mark.parametrize("name", SHARED_BY_B_AND_C)
def test_blocks_copied_between_stage_b_and_c_are_identical(name):
    assert inspect.getsource(getattr(stage_b, name)) == inspect.getsource(getattr(stage_c, name))


@pytest.mark.parametrize("name", SHARED_BY_ALL)
def test_loading_helpers_are_identical_in_all_stage_files(name):
    sources = {inspect.getsource(getattr(m, name)) for m in (stage_a, stage_b, stage_c)}
    assert len(sources) == 1, f"{name} differs between the stage files"


def test_stage_markers_identical():
    assert stage_a._STAGE_MARKERS == stage_b._STAGE_MARKERS == stage_c._STAGE_MARKERS
