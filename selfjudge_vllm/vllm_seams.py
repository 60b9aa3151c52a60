"""The register of every vLLM internal the plugin patches or reads, and the check of a vLLM
source tree against it.

Each seam names a vLLM module and an attribute path, whether the plugin patches it or reads
it, and why. `check_source` decides from the module's source text alone (Python's ast, no
import), so the same check runs at worker start-up on the installed vLLM (a renamed internal
fails the engine at start, not at the first step) and on a downloaded wheel of another
version (`selfjudge check-vllm WHEEL`), without installing it.

Each seam belongs to every runner (`ANY`) or to one of vLLM's two model runners: `V1`
(`vllm/v1/worker/gpu_model_runner.py`, vLLM <= 0.33; adapter_v1.py) or `V2` (Model Runner
V2, `vllm/v1/worker/gpu/`, the only runner from vLLM 0.34; adapter_v2.py). A vLLM tree is
checked against the seams of the runner the plugin would hook there (`runner_of`): V1 where
the V1 runner module exists, else V2.

An attribute `Class.name` is present when the class body defines it (a method, property or
annotated field) or one of its methods assigns `self.name`. `function(param)` asks for a
parameter of that name.

Checked: vLLM 0.32.0 (V1; run: the CPU build, every test), 0.33.0 (V1; source-checked from the
upstream wheel with `selfjudge check-vllm`; not run), 0.34.0 (V2; source-checked from the
upstream wheel; the adapter tested against model runner V2's verification code in the tests,
not run in an engine: no CPU build of 0.34 can be made on this project's machines).
"""

from __future__ import annotations

import ast
import importlib.util
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PATCHED, READ = "patched", "read"
ANY, V1, V2 = "any", "v1", "v2"
# The module whose presence means vLLM still has model runner V1 (removed in 0.34.0).
V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


@dataclass(frozen=True)
class Seam:
    module: str  # e.g. "vllm.v1.worker.gpu_model_runner"
    path: str  # "Class.attr", "function", or "function(param)"
    kind: str  # PATCHED or READ
    why: str
    runner: str = ANY  # ANY, V1 or V2

    @property
    def name(self) -> str:
        return f"{self.module}:{self.path}"


_RUNNER = V1_RUNNER_MODULE
_SAMPLER = "vllm.v1.sample.rejection_sampler"
_V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
_V2_VERIFY = "vllm.v1.worker.gpu.spec_decode.rejection_sampler"
_V2_KERNELS = "vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils"
_V2_BATCH = "vllm.v1.worker.gpu.input_batch"
SEAMS = (
    # Both runners. Patched (vllm_patches.py), in the order a process meets them.
    Seam("vllm.v1.worker.worker_base", "WorkerBase.__init__", PATCHED,
         "validate the selfjudge section in every worker and install the step hooks"),
    Seam("vllm.v1.engine.input_processor", "InputProcessor.__init__", PATCHED,
         "build the request validator at start-up (a missing head fails the front end there)"),
    Seam("vllm.v1.engine.input_processor", "InputProcessor._validate_params", PATCHED,
         "reject bad selfjudge_* request options at admission (HTTP 400)"),
    Seam("vllm.v1.engine.input_processor", "InputProcessor.vllm_config", READ, "the served config at admission"),
    Seam("vllm.sampling_params", "SamplingParams.extra_args", READ, "a request's selfjudge_* options"),
    # Read at start-up (vllm_patches.py, factories.py, stat_logger.py).
    Seam("vllm.config.vllm", "VllmConfig.additional_config", READ, "the selfjudge section"),
    Seam("vllm.config.vllm", "VllmConfig.speculative_config", READ, "refuse the judge without speculative decoding"),
    Seam("vllm.config.speculative", "SpeculativeConfig.method", READ, "refuse unsupported proposers"),
    Seam("vllm.config.speculative", "SpeculativeConfig.rejection_sample_method", READ,
         "vLLM's own lossy verifiers (fly from 0.33, synthetic, block) with the judge on are refused"),
    Seam("vllm.config.vllm", "VllmConfig.reasoning_config", READ, "scope reasoning: the served reasoning parser"),
    Seam("vllm.config.reasoning", "ReasoningConfig.enabled", READ, "scope reasoning: marker ids resolved"),
    Seam("vllm.config.reasoning", "ReasoningConfig.reasoning_parser", READ, "scope reasoning: named in errors"),
    Seam("vllm.config.reasoning", "ReasoningConfig.reasoning_start_token_ids", READ,
         "scope reasoning: the parser's start marker"),
    Seam("vllm.config.reasoning", "ReasoningConfig.natural_reasoning_end_token_ids", READ,
         "scope reasoning: the parser's end marker (the model's own, not the forced budget string)"),
    Seam("vllm.config.vllm", "VllmConfig.scheduler_config", READ, "batch limits and scheduling mode"),
    Seam("vllm.config.scheduler", "SchedulerConfig.max_num_seqs", READ,
         "memory profiling: the most requests one step verifies"),
    Seam("vllm.config.scheduler", "SchedulerConfig.async_scheduling", READ,
         "scope reasoning is refused under async scheduling (placeholder tokens)"),
    Seam("vllm.config.speculative", "SpeculativeConfig.num_speculative_tokens", READ,
         "memory profiling: the most draft rows per request"),
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
    Seam("vllm.config.model", "ModelConfig.skip_tokenizer_init", READ,
         "the guard's meaning measure reads response texts: refused on a server that makes none"),
    Seam("vllm.v1.metrics.loggers", "StatLoggerBase", READ, "base class of the /metrics counters"),
    Seam("vllm.platforms.interface", "Platform.is_cpu", READ, "the #55005 fix applies on CPU only (cpu_fix.py)"),

    # Model runner V1 (vLLM <= 0.33; adapter_v1.py). Patched, in the order a worker meets them.
    Seam(_RUNNER, "GPUModelRunner.__init__", PATCHED, "attach the JudgeRuntime (CPUModelRunner inherits it)", V1),
    Seam(_RUNNER, "GPUModelRunner.sample_tokens", PATCHED,
         "keep the step's hidden states, logits and draft metadata for the verification call", V1),
    Seam(_SAMPLER, "rejection_sample", PATCHED, "apply each row's rule to target_logits, then verify as usual", V1),
    Seam(_RUNNER, "GPUModelRunner._dummy_sampler_run", PATCHED,
         "memory profiling: run the judge's vocabulary-wide work on the dummy rows (KV cache sized with it)", V1),
    Seam(_SAMPLER, "expand_batch_to_tokens", PATCHED, "CPU fix of vLLM bug #55005 (cpu_fix.py)", V1),
    # Read on the V1 step path (adapter_v1._wrap_sample_tokens / _wrap_rejection_sample).
    Seam(_RUNNER, "GPUModelRunner.execute_model_state", READ, "the step's state between execute and sample", V1),
    Seam(_RUNNER, "ExecuteModelState.spec_decode_metadata", READ, "None when the step verifies no drafts", V1),
    Seam(_RUNNER, "ExecuteModelState.sample_hidden_states", READ, "the hidden-state feature", V1),
    Seam(_RUNNER, "ExecuteModelState.logits", READ, "the logit features (the model's own logits)", V1),
    Seam("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata.draft_token_ids", READ,
         "the drafts; identifies the verification call of this step", V1),
    Seam("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata.target_logits_indices", READ,
         "the row verifying each draft (the next row holds its hidden state)", V1),
    Seam("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata.num_draft_tokens", READ, "drafts per request", V1),
    Seam(_RUNNER, "GPUModelRunner.input_batch", READ, "the batch's request order", V1),
    Seam("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids", READ, "request ids in batch order", V1),
    Seam(_RUNNER, "GPUModelRunner.requests", READ, "per-request state", V1),
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState.sampling_params", READ, "a request's parameters", V1),
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState.prompt_token_ids", READ,
         "scope reasoning: a start marker in the prompt", V1),
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState.output_token_ids", READ,
         "scope reasoning: the end marker in the output", V1),
    Seam(_SAMPLER, "rejection_sample(draft_token_ids)", READ, "found by name in the patched call", V1),
    Seam(_SAMPLER, "rejection_sample(target_logits)", READ, "found by name in the patched call", V1),
    Seam("vllm.config.vllm", "VllmConfig.use_v2_model_runner", READ,
         "vLLM 0.32-0.33 may select V2 where V1 exists: refuse it there (VLLM_USE_V2_MODEL_RUNNER=0)", V1),

    # Model runner V2 (vLLM >= 0.34; adapter_v2.py). Patched, in the order a worker meets them.
    Seam(_V2_RUNNER, "GPUModelRunner.__init__", PATCHED,
         "attach the JudgeRuntime (CPUModelRunner, the x86 CPU runner, subclasses it)", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.load_model", PATCHED,
         "refuse at start-up a model state that samples more than one new token per step", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.add_requests", PATCHED, "keep each new request's selfjudge_* options", V2),
    Seam(_V2_RUNNER, "GPUModelRunner._remove_request", PATCHED,
         "drop a finished or preempted request's rule state", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.sample", PATCHED,
         "keep the step's hidden states and batch layout; fail the step if its drafts were not judged", V2),
    Seam(_V2_VERIFY, "RejectionSampler.__call__", PATCHED,
         "keep the model's own logits (grammar masks only) for the logit features", V2),
    Seam(_V2_VERIFY, "rejection_sample", PATCHED,
         "imported there from rejection_sampler_utils and looked up at call time by "
         "RejectionSampler._verify: apply each draft row's rule to a chunk's processed logits, "
         "then verify as usual", V2),
    Seam(_V2_RUNNER, "GPUModelRunner._dummy_sampler_run", PATCHED,
         "memory profiling: the judge's vocabulary-wide work on the dummy rows, its temporaries held "
         "while vLLM's dummy pass runs", V2),
    # Read on the V2 step path.
    Seam(_V2_RUNNER, "GPUModelRunner.sample(hidden_states)", READ, "all token rows' final-norm hidden states", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.sample(input_batch)", READ, "the step's batch", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.rejection_sampler", READ, "None: the step verifies nothing", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.batch_sharder", READ, "batch-sharded sampling is refused", V2),
    Seam(_V2_RUNNER, "GPUModelRunner.model_state", READ, "the model's sampling layout", V2),
    Seam("vllm.v1.worker.gpu.model_states.interface", "ModelState.compute_sample_logits", READ,
         "memory profiling: the dummy rows' logits, as sample computes them", V2),
    Seam("vllm.v1.worker.gpu.model_states.interface", "ModelState.num_new_sampled_tokens_per_step", READ,
         "1: a request's last logits row is its only bonus row (other layouts are refused)", V2),
    Seam(_V2_BATCH, "InputBatch.req_ids", READ, "request ids in batch order", V2),
    Seam(_V2_BATCH, "InputBatch.num_reqs", READ, "requests in the step", V2),
    Seam(_V2_BATCH, "InputBatch.num_draft_tokens", READ, "0: the step verifies nothing", V2),
    Seam(_V2_BATCH, "InputBatch.logits_indices", READ, "token row of each logits row (hidden-state rows)", V2),
    Seam(_V2_BATCH, "InputBatch.cu_num_logits_np", READ,
         "host layout: request i's logits rows; all but the last verify its drafts", V2),
    Seam(_V2_VERIFY, "RejectionSampler.__call__(logits)", READ, "the model's own logits", V2),
    Seam(_V2_KERNELS, "rejection_sample(target_logits)", READ,
         "processed logits of a chunk; chunks come in batch order and never split a request", V2),
    Seam(_V2_KERNELS, "rejection_sample(draft_sampled)", READ,
         "the input token of each logits row: row r verifies draft_sampled[r + 1] (-1: placeholder)", V2),
    Seam("vllm.v1.core.sched.output", "NewRequestData.req_id", READ, "a new request's id", V2),
    Seam("vllm.v1.core.sched.output", "NewRequestData.sampling_params", READ, "a new request's options", V2),
    Seam("vllm.v1.core.sched.output", "SchedulerOutput.scheduled_new_reqs", READ, "the requests a step adds", V2),
    Seam("vllm.config.speculative", "SpeculativeConfig.enable_adaptive_verification", READ,
         "adaptive verification compacts the logits rows: refused", V2),
    Seam("vllm.config.parallel", "ParallelConfig.enable_batch_sharded_sampling", READ,
         "batch-sharded sampling is refused at start-up", V2),
    # Guarded serving, API server process (adapter_guard.py): both runners.
    Seam("vllm.v1.engine.async_llm", "AsyncLLM.generate", PATCHED,
         "the guard: fallback defaults, and a lossless shadow of sampled relaxed requests"),
    Seam("vllm.v1.engine.async_llm", "AsyncLLM.generate(priority)", READ, "shadows run at the lowest priority"),
    Seam("vllm.v1.engine.async_llm", "AsyncLLM.vllm_config", READ, "the guard's section and the scheduling policy"),
    Seam("vllm.config.scheduler", "SchedulerConfig.policy", READ, "a priority is only passed under 'priority'"),
    Seam("vllm.sampling_params", "SamplingParams.clone", READ, "the fallback's and the shadow's own parameters"),
    Seam("vllm.sampling_params", "SamplingParams.temperature", READ, "only greedy requests are shadowed"),
    Seam("vllm.sampling_params", "SamplingParams.n", READ, "only one-sequence requests are shadowed"),
    Seam("vllm.sampling_params", "SamplingParams.max_tokens", READ,
         "one-token requests (beam search steps) cannot change: never shadowed"),
    Seam("vllm.sampling_params", "SamplingParams.output_kind", READ,
         "delta outputs are accumulated; the shadow asks for the final output only"),
    Seam("vllm.sampling_params", "RequestOutputKind.DELTA", READ, "streaming outputs hold only new tokens"),
    Seam("vllm.sampling_params", "RequestOutputKind.FINAL_ONLY", READ, "the shadow's output kind"),
    Seam("vllm.outputs", "RequestOutput.outputs", READ, "the response's tokens and text"),
    Seam("vllm.outputs", "RequestOutput.finished", READ, "only finished responses are compared"),
    Seam("vllm.outputs", "CompletionOutput.finish_reason", READ,
         "a response aborted or failed by the engine is abandoned, not compared"),
    Seam("vllm.outputs", "CompletionOutput.token_ids", READ, "measure text compares token ids"),
    Seam("vllm.outputs", "CompletionOutput.text", READ, "measure answer compares the answers"),
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
    "Class.method(param)", or "Name" for a module-level class/function/assignment/import)."""
    return _defines(ast.parse(source), path)


def _defines(tree: ast.Module, path: str) -> bool:
    """check_source on a parsed module."""
    if path.endswith(")"):
        name, _, param = path[:-1].partition("(")
        cls_name, _, method = name.rpartition(".")
        cls = _class(tree, cls_name) if cls_name else None
        fn = _function(cls.body if cls is not None else [] if cls_name else tree.body, method)
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
        # A module-level import binds the name too (a wrap of it is what the module calls).
        or (isinstance(n, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == path for a in n.names))
        for n in tree.body)


def _module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def runner_of(read_source) -> str:
    """The runner the plugin hooks in a vLLM source tree: V1 while vLLM has it, else V2."""
    return V1 if read_source(_module_file(V1_RUNNER_MODULE)) is not None else V2


def seams_for(runner: str) -> tuple[Seam, ...]:
    return tuple(seam for seam in SEAMS if seam.runner in (ANY, runner))


def missing_seams(read_source, runner: str | None = None) -> list[Seam]:
    """The seams a vLLM source tree lacks for `runner` (default: the one it would be hooked
    through); read_source(relative path) -> text or None."""
    missing, trees = [], {}
    for seam in seams_for(runner or runner_of(read_source)):
        if seam.module not in trees:  # parsed once per module: most modules hold several seams
            source = read_source(_module_file(seam.module))
            trees[seam.module] = None if source is None else ast.parse(source)
        if trees[seam.module] is None or not _defines(trees[seam.module], seam.path):
            missing.append(seam)
    return missing


@lru_cache(maxsize=None)
def _installed_source(relative: str) -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / relative
    return path.read_text() if path.is_file() else None


def installed_runner() -> str:
    """The runner the plugin hooks in the installed vLLM."""
    return runner_of(_installed_source)


def missing_in_installed_vllm() -> list[Seam]:
    """The seams the installed vLLM lacks (worker start-up; checked once per process: the
    installed source does not change under a running process)."""
    return list(_installed_missing())


@lru_cache(maxsize=None)
def _installed_missing() -> tuple[Seam, ...]:
    return tuple(missing_seams(_installed_source))


def _wheel_reader(wheel: str | Path):
    wheel = Path(wheel)
    if wheel.is_dir():
        return lambda rel: (wheel / rel).read_text() if (wheel / rel).is_file() else None
    with zipfile.ZipFile(wheel) as archive:
        texts = {name: archive.read(name).decode() for name in archive.namelist()
                 if name.endswith(".py") and name.startswith("vllm/")}
    return texts.get


def check_wheel(wheel: str | Path) -> tuple[str, list[Seam]]:
    """(the runner the plugin would hook, the seams missing for it) of a vLLM wheel
    (`pip download --no-deps vllm==X`) or source folder."""
    read = _wheel_reader(wheel)
    runner = runner_of(read)
    return runner, missing_seams(read, runner)


def missing_in_wheel(wheel: str | Path) -> list[Seam]:
    """The seams a vLLM wheel or source folder lacks."""
    return check_wheel(wheel)[1]


# -- the register in docs/vllm-integration.md ---------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "vllm-integration.md"
DOCS_BEGIN = ("<!-- generated from selfjudge_vllm/vllm_seams.py by `python -m selfjudge_vllm.vllm_seams "
              "--write-docs`: do not edit by hand -->")
DOCS_END = "<!-- end of the generated register -->"


def docs_block() -> str:
    """The register as docs/vllm-integration.md shows it: its counts and one row per seam."""
    by_runner = {runner: sum(seam.runner == runner for seam in SEAMS) for runner in (ANY, V1, V2)}
    v1, v2 = len(seams_for(V1)), len(seams_for(V2))
    lines = [
        DOCS_BEGIN, "",
        f"The register holds {len(SEAMS)} seams: {by_runner[ANY]} used on both runners, {by_runner[V1]} on "
        f"model runner V1 only, {by_runner[V2]} on model runner V2 only. A tree with model runner V1 is "
        f"checked against {v1} of them, one with model runner V2 against {v2}:", "",
        "```bash",
        "pip download --no-deps vllm==0.34.0 -d /tmp/w && .venv/bin/selfjudge check-vllm "
        "/tmp/w/vllm-0.34.0-*.whl",
        f"# selfjudge check-vllm: ...vllm-0.34.0-...whl: model runner V2; {v2} of {v2} seams present",
        "```", "",
        "| seam | runner | kind | why |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{seam.name}` | {seam.runner.upper()} | {seam.kind} | {seam.why} |" for seam in SEAMS]
    return "\n".join(lines + ["", DOCS_END])


def docs_with_register(page: str) -> str:
    """`page` with its generated block replaced by the register's current one."""
    begin, end = page.index(DOCS_BEGIN), page.index(DOCS_END) + len(DOCS_END)
    return page[:begin] + docs_block() + page[end:]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The seam register in docs/vllm-integration.md.")
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the generated block of {DOCS.name}")
    if parser.parse_args().write_docs:
        DOCS.write_text(docs_with_register(DOCS.read_text()))
    else:
        print(docs_block())
