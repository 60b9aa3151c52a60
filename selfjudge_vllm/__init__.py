"""selfjudge-vllm: a learned judge inside vLLM's speculative-decoding verification.

This package is imported by every vLLM process (engine, engine core, workers) through the
`vllm.general_plugins` entry point, so importing it must stay cheap: nothing here imports
vLLM, scikit-learn or transformers at module level.
"""

__version__ = "0.1.0"
