"""`vllm-gptq`: one console script, one subcommand per job. Each subcommand lives in the module that
owns the job and exposes `add_arguments(parser)` and `run(args) -> int`; only the chosen one is
imported, so `vllm-gptq inspect` does not pay for vLLM."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "fetch-model": ("vllm_gptq_plugin.offline_quant.models", "materialize a shipped model (smollm2) as an HF folder"),
    "quantize": ("vllm_gptq_plugin.offline_quant.quantize", "quantize a model (GPTQ or RTN) into a checkpoint"),
    "inspect": ("vllm_gptq_plugin.inspect", "validate a checkpoint and print its format, bits, groups, layers"),
    "ppl": ("vllm_gptq_plugin.offline_quant.ppl", "perplexity of a fp or quantized model on a text file"),
    "generate": ("vllm_gptq_plugin.generate", "generate text with vLLM and the gptq-plugin quantization"),
    "export-gguf": ("vllm_gptq_plugin.offline_quant.gguf_export", "export a checkpoint to a GGUF file"),
    "tune-cpu": ("vllm_gptq_plugin.kernels.cpu_dispatch", "time the CPU kernels on this machine; the dispatch uses the table"),
    "eval": ("vllm_gptq_plugin.offline_quant.evaluate", "run lm-eval tasks on checkpoints, one comparison table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    top = argparse.ArgumentParser(prog="vllm-gptq", description="GPTQ quantization and vLLM serving tools")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints usage / the error for an unknown command
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(prog=f"vllm-gptq {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from vllm_gptq_plugin.format import FormatError
    try:
        return int(module.run(args) or 0)
    except (FormatError, FileNotFoundError, FileExistsError) as e:
        print(f"vllm-gptq {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
