"""Tiny random Llama models with a locally trained tokenizer.

vLLM's CPU backend needs attention heads of at least 32 dimensions; hidden 64 with two
heads of 32 is the smallest model it serves. Everything is built from a seed, so two calls
with the same arguments produce byte-identical weights. No network access.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 1024

_WORDS = (
    "the a an of to in is was for on that with as by at from it this be are or "
    "model token draft target judge accept reject verify speculative decoding answer "
    "question number code function return value list sum print if else for while def "
    "one two three four five six seven eight nine ten cat dog house tree river stone "
    "red green blue small large quick slow bright dark north south east west"
).split()


# Prompts in the tiny models' vocabulary (tests, and benchmarks run without real models).
PROMPTS = [
    "the model token draft judge accept",
    "one two three four five six",
    "red green blue small large quick",
    "def sum list return value print",
    "the cat and the dog at the house",
    "north south east west river stone",
    "question answer number code function",
    "verify speculative decoding target",
    "a tree by the river, a stone by the tree",
    "if else for while def return",
    "seven eight nine ten one two",
    "bright dark slow quick small large",
    "print value return sum list code",
    "the house of the cat is blue",
    "judge reject accept verify draft",
    "east west north south the river",
]

def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ":", " = 1", " + 2"]))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> None:
    """Train a byte-level BPE tokenizer on a synthetic corpus and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    # A minimal chat template, so the OpenAI chat endpoint works on these models.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(out_dir))


def build_tiny_llama(
    out_dir: Path,
    *,
    num_layers: int = 2,
    seed: int = 0,
    hidden_size: int = 64,
    truncate_from: Path | None = None,
    tokenizer_seed: int = 0,
    max_positions: int = 512,
) -> Path:
    """Save a random Llama (float32) with the shared tokenizer into out_dir.

    With `truncate_from`, the model is the first `num_layers` layers of that model (same
    embeddings, final norm and head): a draft that agrees with its target on some tokens.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        head_dim=32,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so that greedy outputs are not one repeated token.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    if truncate_from is not None:
        donor = LlamaForCausalLM.from_pretrained(str(truncate_from), dtype=torch.float32)
        state = {
            k: v
            for k, v in donor.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers
        }
        model.load_state_dict(state)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    build_tokenizer(out_dir, seed=tokenizer_seed)
    # vLLM reads generation_config.json; keep greedy defaults neutral.
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    )
    return out_dir


def build_target_and_draft(root: Path, seed: int = 0, max_positions: int = 512) -> tuple[Path, Path]:
    """A 4-layer target and its 1-layer truncation as draft, under root."""
    target = build_tiny_llama(Path(root) / "target", num_layers=4, seed=seed, max_positions=max_positions)
    draft = build_tiny_llama(
        Path(root) / "draft", num_layers=1, seed=seed, truncate_from=target, max_positions=max_positions
    )
    return target, draft


def build_tiny_eagle(out_dir: Path, target_dir: Path, version: int = 1, seed: int = 0) -> Path:
    """A random one-layer EAGLE (version 1) or EAGLE-3 (version 3) head for the tiny Llama
    target, in the checkpoint layout vLLM's `eagle` / `eagle3` methods load (EAGLE-1 shares
    the target's embeddings and LM head; EAGLE-3 reads three target layers)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    out_dir, target_dir = Path(out_dir), Path(target_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    cfg = json.loads((target_dir / "config.json").read_text())
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    # EAGLE-3's first layer attends over [embedding, hidden], so its q/k/v take 2 x hidden.
    attn_in = hidden if version == 1 else 2 * hidden
    layer = "layers.0" if version == 1 else "midlayer"
    weights = {
        f"{layer}.self_attn.q_proj.weight": rand(heads * head_dim, attn_in),
        f"{layer}.self_attn.k_proj.weight": rand(kv_heads * head_dim, attn_in),
        f"{layer}.self_attn.v_proj.weight": rand(kv_heads * head_dim, attn_in),
        f"{layer}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        f"{layer}.mlp.gate_proj.weight": rand(inter, hidden),
        f"{layer}.mlp.up_proj.weight": rand(inter, hidden),
        f"{layer}.mlp.down_proj.weight": rand(hidden, inter),
        f"{layer}.post_attention_layernorm.weight": torch.ones(hidden),
    }
    if version == 1:
        weights["fc.weight"] = rand(hidden, 2 * hidden)
        config = dict(cfg, num_hidden_layers=1, architectures=["EagleLlamaForCausalLM"])
    else:
        weights.update({"fc.weight": rand(hidden, 3 * hidden), f"{layer}.input_layernorm.weight": torch.ones(hidden),
                        f"{layer}.hidden_norm.weight": torch.ones(hidden), "norm.weight": torch.ones(hidden),
                        "lm_head.weight": rand(vocab, hidden)})
        # The tiny target has 4 layers; vLLM's default picks (2, 2, 1), which collapses to two.
        config = dict(cfg, num_hidden_layers=1, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=vocab,
                      eagle_aux_hidden_state_layer_ids=[0, 1, 2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in target_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out_dir / f.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"))
    return out_dir


def write_head(
    out_dir: Path,
    target_dir: Path,
    weight,
    bias: float,
    threshold: float = 0.5,
    operating_points: dict | None = None,
    scalar_weight=None,
    logit_features: tuple[str, ...] = (),
) -> Path:
    """Write a judge artifact with the given head for the model in target_dir: format 1
    (hidden state only), or format 2 when `logit_features` are given (weight None: the head
    reads no hidden state)."""
    import torch

    from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, TargetIdentity

    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    config = JudgeArtifactConfig(
        target=TargetIdentity(
            name=str(target_dir),
            architecture=cfg["architectures"][0],
            hidden_size=cfg["hidden_size"],
            vocab_size=cfg["vocab_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
        ),
        default_threshold=threshold,
        operating_points=operating_points or {},
        provenance={"made_by": "selfjudge_vllm.testing.write_head"},
        format_version=2 if logit_features else 1,
        features=(("hidden",) if weight is not None else ()) + tuple(logit_features),
    )
    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    scalar = None if scalar_weight is None else torch.as_tensor(scalar_weight, dtype=torch.float32)
    JudgeArtifact(config, weight, torch.tensor([bias]), scalar).save(out_dir)
    return Path(out_dir)
