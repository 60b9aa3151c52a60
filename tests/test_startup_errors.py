"""Bad input fails at start-up with an error that names the problem; never a silent
unjudged server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfjudge_vllm.config import parse_section
from selfjudge_vllm.testing.tiny_models import build_tiny_llama, write_head
from selfjudge_vllm.vllm_patches import UnsupportedConfiguration, check_serving_configuration
from tests.engine_helpers import PROMPTS, run_engine, spec_config

GREEDY = {"max_tokens": 4, "temperature": 0.0}


def _fake_vllm_config(method="draft_model", v2=False, spec=True):
    speculative = SimpleNamespace(method=method) if spec else None
    return SimpleNamespace(speculative_config=speculative, use_v2_model_runner=v2)


@pytest.mark.parametrize(
    "vllm_config, message",
    [
        (_fake_vllm_config(v2=True), "VLLM_USE_V2_MODEL_RUNNER=0"),
        (_fake_vllm_config(method="medusa"), "not 'medusa'"),
        (_fake_vllm_config(method="suffix"), "arctic-inference"),
        (_fake_vllm_config(method="mtp"), "multi-token-prediction"),
        (_fake_vllm_config(spec=False), "speculative decoding is off"),
    ],
)
def test_configurations_the_judge_cannot_serve_are_refused(vllm_config, message):
    config = parse_section({"selfjudge": {"head": "/unused"}})
    with pytest.raises(UnsupportedConfiguration, match=message):
        check_serving_configuration(vllm_config, config)


def test_judge_off_needs_no_speculative_config():
    config = parse_section({"selfjudge": {"enabled": False}})
    check_serving_configuration(_fake_vllm_config(spec=False, v2=True), config)


@pytest.mark.engine
class TestEngineRefusesToStart:
    @pytest.fixture(scope="class")
    def good_head(self, workdir, tiny_pair):
        return write_head(workdir / "heads/good", tiny_pair[0], torch.zeros(64), bias=0.0)

    def _start(self, tiny_pair, section, spec="draft_model"):
        target, draft = tiny_pair
        speculative = spec_config(spec, draft) if spec else None
        return run_engine(target, speculative, PROMPTS[:2], GREEDY, {"selfjudge": section})

    def test_missing_artifact(self, tiny_pair, tmp_path):
        with pytest.raises(Exception, match="missing config.json"):
            self._start(tiny_pair, {"head": str(tmp_path / "nowhere")})

    def test_corrupt_weights(self, tiny_pair, good_head, tmp_path):
        import shutil

        broken = tmp_path / "broken"
        shutil.copytree(good_head, broken)
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(Exception, match="unreadable"):
            self._start(tiny_pair, {"head": str(broken)})

    def test_artifact_for_another_model(self, tiny_pair, workdir):
        other = build_tiny_llama(workdir / "models/other-128", num_layers=2, hidden_size=128, seed=3)
        head = write_head(workdir / "heads/other", other, torch.zeros(128), bias=0.0)
        with pytest.raises(Exception, match="hidden_size: artifact 128, served 64"):
            self._start(tiny_pair, {"head": str(head)})

    def test_unknown_key_and_bad_threshold(self, tiny_pair, good_head):
        with pytest.raises(Exception, match="Extra inputs are not permitted"):
            self._start(tiny_pair, {"head": str(good_head), "treshold": 0.5})
        with pytest.raises(Exception, match="between 0 and 1"):
            self._start(tiny_pair, {"head": str(good_head), "threshold": 1.2})

    def test_judge_enabled_without_speculative_decoding(self, tiny_pair, good_head):
        with pytest.raises(Exception, match="speculative decoding is off"):
            self._start(tiny_pair, {"head": str(good_head)}, spec=None)

    def test_unsupported_vllm_version_needs_an_explicit_override(
        self, tiny_pair, good_head, monkeypatch
    ):
        import vllm

        monkeypatch.setattr(vllm, "__version__", "0.99.0")
        with pytest.raises(Exception, match="run in an engine on vLLM 0.32.0, not 0.99.0"):
            self._start(tiny_pair, {"head": str(good_head)})
        result = self._start(tiny_pair, {"head": str(good_head), "allow_unsupported_vllm": True})
        assert result.judge is not None and result.judge["steps_judged"] > 0


def test_a_missing_vllm_internal_is_refused_at_worker_start_naming_it(monkeypatch):
    """The worker start-up check of the register (vllm_seams): what it raises."""
    from selfjudge_vllm import vllm_patches, vllm_seams

    seam = next(s for s in vllm_seams.SEAMS if s.path == "ExecuteModelState.sample_hidden_states")
    monkeypatch.setattr(vllm_seams, "missing_in_installed_vllm", lambda: [seam])
    with pytest.raises(UnsupportedConfiguration, match="ExecuteModelState.sample_hidden_states \\(read: the hidden"):
        vllm_patches.check_seams_present()
