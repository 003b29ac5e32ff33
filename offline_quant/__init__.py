"""Offline GPTQ quantization. The Python API lives in `api` (the module `quantize` is the driver):

    from vllm_gptq_plugin.offline_quant.api import QuantConfig, quantize, load
"""
