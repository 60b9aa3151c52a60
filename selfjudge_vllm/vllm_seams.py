"""The register of every vLLM internal the plugin patches or reads, and the check of a vLLM
source tree against it.

Each seam names a vLLM module and an attribute path, whether the plugin patches it or reads
it, and why. `check_source` decides from the module's source text alone (Python's ast, no
import), so the same check runs at worker start-up on the installed vLLM (a renamed internal
fails the engine at start, not at the first step) and on a downloaded wheel of another
version (`selfjudge check-vllm WHEEL`), without installing it.

An attribute `Class.name` is present when the class body defines it (a method, property or
annotated field) or one of its methods assigns `self.name`. `function(param)` asks for a
parameter of that name.

Checked: vLLM 0.32.0 (run: the CPU build, every test), 0.33.0 (source-checked from the
upstream wheel with `selfjudge check-vllm`; not run).
"""

from __future__ import annotations

import ast
import importlib.util
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PATCHED, READ = "patched", "read"


@dataclass(frozen=True)
class Seam:
    module: str  # e.g. "vllm.v1.worker.gpu_model_runner"
    path: str  # "Class.attr", "function", or "function(param)"
    kind: str  # PATCHED or READ
    why: str

    @property
    def name(self) -> str:
        return f"{self.module}:{self.path}"


_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SAMPLER = "vllm.v1.sample.rejection_sampler"
SEAMS = (
    # Patched (vllm_patches.py), in the order a worker meets them.
    Seam("vllm.v1.worker.worker_base", "WorkerBase.__init__", PATCHED,
         "validate the selfjudge section in every worker and install the step hooks"),
    Seam(_RUNNER, "GPUModelRunner.__init__", PATCHED, "attach the JudgeRuntime (CPUModelRunner inherits it)"),
    Seam(_RUNNER, "GPUModelRunner.sample_tokens", PATCHED,
         "keep the step's hidden states, logits and draft metadata for the verification call"),
    Seam(_SAMPLER, "rejection_sample", PATCHED, "apply each row's rule to target_logits, then verify as usual"),
    Seam(_RUNNER, "GPUModelRunner._dummy_sampler_run", PATCHED,
         "memory profiling: run the judge's vocabulary-wide work on the dummy rows (KV cache sized with it)"),
    Seam("vllm.v1.engine.input_processor", "InputProcessor.__init__", PATCHED,
         "build the request validator at start-up (a missing head fails the front end there)"),
    Seam("vllm.v1.engine.input_processor", "InputProcessor._validate_params", PATCHED,
         "reject bad selfjudge_* request options at admission (HTTP 400)"),
    Seam(_SAMPLER, "expand_batch_to_tokens", PATCHED, "CPU fix of vLLM bug #55005 (cpu_fix.py)"),
    # Read on the step path (vllm_patches._wrap_sample_tokens / _wrap_rejection_sample).
    Seam(_RUNNER, "GPUModelRunner.execute_model_state", READ, "the step's state between execute and sample"),
    Seam(_RUNNER, "ExecuteModelState.spec_decode_metadata", READ, "None when the step verifies no drafts"),
    Seam(_RUNNER, "ExecuteModelState.sample_hidden_states", READ, "the hidden-state feature"),
    Seam(_RUNNER, "ExecuteModelState.logits", READ, "the logit features (the model's own logits)"),
    Seam("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata.draft_token_ids", READ,
         "the drafts; identifies the verification call of this step"),
    Seam("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata.target_logits_indices", READ,
         "the row verifying each draft (the next row holds its hidden state)"),
    Seam("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata.num_draft_tokens", READ, "drafts per request"),
    Seam(_RUNNER, "GPUModelRunner.input_batch", READ, "the batch's request order"),
    Seam("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids", READ, "request ids in batch order"),
    Seam(_RUNNER, "GPUModelRunner.requests", READ, "per-request state"),
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState.sampling_params", READ, "a request's parameters"),
    Seam("vllm.sampling_params", "SamplingParams.extra_args", READ, "a request's selfjudge_* options"),
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState.prompt_token_ids", READ,
         "scope reasoning: a start marker in the prompt"),
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState.output_token_ids", READ,
         "scope reasoning: the end marker in the output"),
    Seam(_SAMPLER, "rejection_sample(draft_token_ids)", READ, "found by name in the patched call"),
    Seam(_SAMPLER, "rejection_sample(target_logits)", READ, "found by name in the patched call"),
    Seam("vllm.v1.engine.input_processor", "InputProcessor.vllm_config", READ, "the served config at admission"),
    # Read at start-up (plugin.py, stat_logger.py).
    Seam("vllm.config.vllm", "VllmConfig.additional_config", READ, "the selfjudge section"),
    Seam("vllm.config.vllm", "VllmConfig.speculative_config", READ, "refuse the judge without speculative decoding"),
    Seam("vllm.config.speculative", "SpeculativeConfig.method", READ, "refuse unsupported proposers"),
    Seam("vllm.config.vllm", "VllmConfig.use_v2_model_runner", READ, "refuse model runner V2"),
    Seam("vllm.config.vllm", "VllmConfig.reasoning_config", READ, "scope reasoning: the served reasoning parser"),
    Seam("vllm.config.reasoning", "ReasoningConfig.enabled", READ, "scope reasoning: marker ids resolved"),
    Seam("vllm.config.reasoning", "ReasoningConfig.reasoning_parser", READ, "scope reasoning: named in errors"),
    Seam("vllm.config.reasoning", "ReasoningConfig.reasoning_start_token_ids", READ,
         "scope reasoning: the parser's start marker"),
    Seam("vllm.config.reasoning", "ReasoningConfig.natural_reasoning_end_token_ids", READ,
         "scope reasoning: the parser's end marker (the model's own, not the forced budget string)"),
    Seam("vllm.config.vllm", "VllmConfig.parallel_config", READ, "tensor-parallel rank"),
    Seam("vllm.config.parallel", "ParallelConfig.rank", READ, "only rank 0 publishes counters"),
    Seam("vllm.config.vllm", "VllmConfig.instance_id", READ, "where the counters of this server live"),
    Seam("vllm.config.vllm", "VllmConfig.model_config", READ, "the served model"),
    Seam("vllm.config.model", "ModelConfig.model", READ, "the served model's name"),
    Seam("vllm.config.model", "ModelConfig.served_model_name", READ, "the metrics' model label"),
    Seam("vllm.config.model", "ModelConfig.architectures", READ, "check the artifact's target"),
    Seam("vllm.config.model", "ModelConfig.hf_text_config", READ, "check the artifact's target (layers)"),
    Seam("vllm.config.model", "ModelConfig.get_hidden_size", READ, "check the artifact's target"),
    Seam("vllm.config.model", "ModelConfig.get_vocab_size", READ, "check the artifact's target"),
    Seam("vllm.v1.metrics.loggers", "StatLoggerBase", READ, "base class of the /metrics counters"),
    Seam("vllm.platforms.interface", "Platform.is_cpu", READ, "the #55005 fix applies on CPU only (cpu_fix.py)"),
)


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _function(body, name: str):
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def _class_has(cls: ast.ClassDef, attr: str) -> bool:
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attr:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            return True
    for node in ast.walk(cls):  # self.attr = ... in any method
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == attr and isinstance(t.value, ast.Name) and t.value.id == "self":
                return True
    return False


def check_source(source: str, path: str) -> bool:
    """Whether the module source defines `path` ("Class.attr", "function", "function(param)",
    or "Name" for a module-level class/function/assignment)."""
    tree = ast.parse(source)
    if path.endswith(")"):
        name, _, param = path[:-1].partition("(")
        fn = _function(tree.body, name)
        if fn is None:
            return False
        args = fn.args
        return param in {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    if "." in path:
        cls_name, attr = path.split(".", 1)
        cls = _class(tree, cls_name)
        return cls is not None and _class_has(cls, attr)
    return any(
        (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == path)
        or (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == path for t in n.targets))
        for n in tree.body)


def _module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def missing_seams(read_source) -> list[Seam]:
    """The seams a vLLM source tree lacks; read_source(relative path) -> text or None."""
    missing = []
    for seam in SEAMS:
        source = read_source(_module_file(seam.module))
        if source is None or not check_source(source, seam.path):
            missing.append(seam)
    return missing


@lru_cache(maxsize=None)
def _installed_source(relative: str) -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / relative
    return path.read_text() if path.is_file() else None


def missing_in_installed_vllm() -> list[Seam]:
    """The seams the installed vLLM lacks (worker start-up)."""
    return missing_seams(_installed_source)


def missing_in_wheel(wheel: str | Path) -> list[Seam]:
    """The seams a vLLM wheel (`pip download --no-deps vllm==X`) or source folder lacks."""
    wheel = Path(wheel)
    if wheel.is_dir():
        return missing_seams(lambda rel: (wheel / rel).read_text() if (wheel / rel).is_file() else None)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        return missing_seams(lambda rel: archive.read(rel).decode() if rel in names else None)
