"""vllm-gptq-plugin: GPTQ quantization (vllm_gptq_plugin.offline_quant), the checkpoint format
(vllm_gptq_plugin.format), dequant-GEMM kernels (vllm_gptq_plugin.kernels) and the vLLM glue.

Importing this package is cheap: vLLM and Triton are imported only by the code that needs them.
"""

__version__ = "0.1.0"
QUANT_NAME = "gptq-plugin"


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM calls it in every process, so it is idempotent."""
    from vllm_gptq_plugin.vllm_config import register_config

    register_config()
