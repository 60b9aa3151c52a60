"""The `selfjudge` command.

    selfjudge inspect HEAD_DIR     validate a judge artifact and print what it holds
"""

from __future__ import annotations

import argparse
import sys


def _inspect(args: argparse.Namespace) -> int:
    from selfjudge_vllm.artifact import ArtifactError, JudgeArtifact

    try:
        artifact = JudgeArtifact.load(args.head)
    except ArtifactError as exc:
        print(f"selfjudge inspect: {exc}", file=sys.stderr)
        return 2
    config = artifact.config
    target = config.target
    print(f"judge artifact {args.head} (format v{config.format_version})")
    print(f"  target: {target.name} ({target.architecture}, hidden {target.hidden_size}, "
          f"vocab {target.vocab_size}, {target.num_hidden_layers} layers)")
    print(f"  feature: {config.feature}")
    print(f"  default threshold: {config.default_threshold:.4f}")
    for name, point in sorted(config.operating_points.items()):
        extra = ", ".join(f"{k}={v:.3f}" for k, v in sorted(point.metrics.items()))
        print(f"  operating point {name}: threshold {point.threshold:.4f}"
              + (f" ({extra})" if extra else ""))
    for key, value in sorted(config.provenance.items()):
        print(f"  provenance {key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfjudge",
        description="SelfJudge for vLLM: build and inspect judge heads for speculative decoding.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="validate a judge artifact and print its contents")
    inspect.add_argument("head", help="judge artifact directory (config.json + model.safetensors)")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
