"""Offline GPTQ quantization. The Python API lives in `api`; `driver` runs GPTQ on a whole model,
`quantize` is the `vllm-gptq quantize` command:

    from vllm_gptq_plugin.offline_quant.api import QuantConfig, quantize, load
"""
