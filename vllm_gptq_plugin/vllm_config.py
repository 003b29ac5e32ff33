"""The vLLM quantization config `gptq-plugin`: maps a GPTQ checkpoint's fields to behaviour.

vLLM builds it once per engine from config.json's `quantization_config` (or quantize_config.json),
then asks it, layer by layer, which linear method to use: ours (vllm_gptq_plugin.linear_method) for
quantized layers, vLLM's unquantized method for modules the `dynamic` rules skip. Reading the fields is
vllm_gptq_plugin.format's job (QuantConfig); this module only decides, and refuses with reasons.

Checks happen as early as vLLM lets them: settings in `from_config`; each safetensors file's header
against its size (truncated or inconsistent files) and tensor shapes and dtypes against the config in
`maybe_update_config` (headers only, no data read), both in the process that builds the engine config,
before any worker starts. Values (finite scales, g_idx range, symmetric zero points) are checked by the
linear method on the tensors vLLM has just loaded, before the kernel sees them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_gptq_plugin import QUANT_NAME
from vllm_gptq_plugin import format as fmt

# safetensors header dtype names of the tensors the format fixes (docs/FORMAT.md)
_HEADER_DTYPES = {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}


class GPTQPluginConfig(QuantizationConfig):
    """`--quantization gptq-plugin`: GPTQ v1/v2 checkpoints, 2/3/4/8 bits, sym or asym, act-order,
    per-module `dynamic` overrides. The quantized lm_head is refused (see `from_config`)."""

    def __init__(self, qcfg: fmt.QuantConfig | None = None) -> None:
        super().__init__()
        # None only when vLLM found no quantization config next to the weights; maybe_update_config
        # then reads quantize_config.json itself or refuses the model (see get_config_filenames).
        self.qcfg = qcfg
        self.quantized_modules: set[str] | None = None  # from the safetensors headers
        self.module_files: dict[str, str] = {}  # quantized module -> the file holding it, for messages
        self.checkpoint = "the checkpoint"  # its folder, once maybe_update_config has seen it

    def __repr__(self) -> str:
        return f"GPTQPluginConfig({self.qcfg})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Volta: what Triton supports; CPUs report no capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Empty on purpose: when config.json has no quantization_config vLLM then builds us with no
        # arguments and calls maybe_update_config(model path), where we read quantize_config.json or
        # say why the model is not a GPTQ checkpoint (vLLM's own message would be "Cannot find the
        # config file for gptq-plugin").
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQPluginConfig":
        return cls(parse_quant_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """A `quant_method: gptq` checkpoint loads with the plugin when the user asks for it."""
        if user_quant == QUANT_NAME and str(hf_quant_cfg.get("quant_method", "")).lower() in ("gptq", QUANT_NAME):
            return QUANT_NAME
        return None

    def get_checkpoint_weight_mapper(self):
        # vLLM's default mapper drops `.g_idx` (its kernels ignore act-order); we need it.
        from vllm.model_executor.models.utils import WeightsMapper
        return WeightsMapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.quantized_modules is not None:
            self.quantized_modules = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_modules)))
        self.module_files = {hf_to_vllm_mapper.map_name(m): f for m, f in self.module_files.items()}

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        if self.qcfg is None:
            if not Path(model_name).is_dir():
                raise fmt.FormatError(
                    f"{model_name} has no quantization_config in its config.json: it is not a GPTQ "
                    f"checkpoint, so --quantization {QUANT_NAME} cannot load it; drop --quantization "
                    "or quantize it first with `vllm-gptq quantize`")
            try:
                self.qcfg = fmt.read_quant_config(model_name)
            except fmt.FormatError as e:
                raise fmt.FormatError(f"--quantization {QUANT_NAME} needs a GPTQ checkpoint: {e}; "
                                      "or drop --quantization to serve the model unquantized") from e
        self.checkpoint = model_name
        if Path(model_name).is_dir():  # each file's header checked against its size, and named
            headers = fmt.read_headers(model_name)
            files = {name: str(f) for name, (f, _) in headers.items()}
            headers = {name: info for name, (_, info) in headers.items()}
        else:  # a hub id: vLLM reads the headers remotely; its loader checks the files it downloads
            from vllm.transformers_utils.config import get_safetensors_params_metadata
            headers, files = get_safetensors_params_metadata(model_name, revision=revision), {}
        self.quantized_modules = check_tensors_match_config(headers, self.qcfg, files, model_name)
        self.module_files = {m: files.get(f"{m}.qweight", model_name) for m in self.quantized_modules}

    def module_config(self, prefix: str) -> fmt.QuantConfig | None:
        """Settings of the vLLM module `prefix`; a fused module (qkv_proj, gate_up_proj) takes those
        of its checkpoint shards, which must agree."""
        assert self.qcfg is not None, "maybe_update_config was not called"
        shards = checkpoint_names(prefix, self.packed_modules_mapping)
        configs = [self.qcfg.for_module(s) for s in shards]
        if any(c != configs[0] for c in configs[1:]):
            raise fmt.FormatError(
                f"{prefix} fuses {shards} in vLLM, but the checkpoint's dynamic rules give them different "
                "settings (bits/group_size/sym or quantized vs not); they must be quantized alike")
        if configs[0] is not None and self.quantized_modules is not None:
            missing = [s for s in shards if s not in self.quantized_modules]
            if missing:
                files = set(self.module_files.values())  # the one weight file, or else the folder
                where = files.pop() if len(files) == 1 else self.checkpoint
                raise fmt.FormatError(
                    f"{where}: tensor {missing[0]}.qweight is missing, but the quantization "
                    f"config quantizes {missing[0]}: the checkpoint is "
                    "incomplete; re-create it")
        return configs[0]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head (refused when quantized), norms: vLLM's defaults
        lcfg = self.module_config(prefix)
        if lcfg is None:
            return UnquantizedLinearMethod()
        from vllm_gptq_plugin.linear_method import GPTQPluginLinearMethod
        shards = checkpoint_names(prefix, self.packed_modules_mapping)
        return GPTQPluginLinearMethod(lcfg, [(s, self.module_files.get(s, "the checkpoint")) for s in shards])


def parse_quant_config(config: dict[str, Any]) -> fmt.QuantConfig:
    """config.json's quantization_config -> QuantConfig, refusing what the plugin cannot serve."""
    config = {"quant_method": "gptq", **config}
    if str(config["quant_method"]).lower() == QUANT_NAME:
        config["quant_method"] = "gptq"
    qcfg = fmt.QuantConfig.from_dict(config)  # FormatError names bad bits/group_size/format
    if qcfg.lm_head:
        raise fmt.FormatError(f"lm_head: true (a quantized lm_head) is not supported by {QUANT_NAME}; "
                              "re-quantize with lm_head: false")
    return qcfg


def checkpoint_names(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """vLLM module name -> the checkpoint module names it holds (qkv_proj -> q_proj, k_proj, v_proj)."""
    parent, _, leaf = prefix.rpartition(".")
    if leaf in packed_modules_mapping:
        return [f"{parent}.{s}" if parent else s for s in packed_modules_mapping[leaf]]
    return [prefix]


def check_tensors_match_config(headers: dict[str, Any], qcfg: fmt.QuantConfig, files: dict[str, str],
                               where: str) -> set[str]:
    """Shapes and dtypes of every quantized layer's tensors against the config (headers only).

    `files` maps tensor names to the file holding them (messages name it; `where` otherwise).
    Returns the names of the quantized modules. Raises FormatError naming the first disagreement.
    """
    names = sorted(k[: -len(".qweight")] for k in headers if k.endswith(".qweight"))
    if not names:
        raise fmt.FormatError(f"{where} declares GPTQ quantization but its safetensors hold no *.qweight "
                              "tensors: the checkpoint is not quantized; re-create it with `vllm-gptq "
                              f"quantize` or drop --quantization {QUANT_NAME}")
    for name in names:
        file = files.get(f"{name}.qweight", where)
        lcfg = qcfg.for_module(name)
        if lcfg is None:
            raise fmt.FormatError(f"{file}: {name} is quantized in the tensors but the config's dynamic "
                                  "rules leave it unquantized; config and tensors disagree")
        info = {}
        for sfx in fmt.QUANT_SUFFIXES:
            if f"{name}.{sfx}" not in headers:
                raise fmt.FormatError(f"{file}: tensor {name}.{sfx} is missing (the layer's other tensors "
                                      "are there): the checkpoint is incomplete; re-create it")
            info[sfx] = headers[f"{name}.{sfx}"]
        k, n = info["g_idx"]["shape"][0], info["scales"]["shape"][-1]
        try:
            want = fmt.expected_shapes(k, n, lcfg)
        except fmt.FormatError as e:
            raise fmt.FormatError(f"{file}: {name}: {e}") from e
        for sfx, meta in info.items():
            file = files.get(f"{name}.{sfx}", where)
            if tuple(meta["shape"]) != want[sfx]:
                raise fmt.FormatError(
                    f"{file}: tensor {name}.{sfx} has shape {list(meta['shape'])}, but the config "
                    f"(bits={lcfg.bits}, group_size={lcfg.group_size}) needs {list(want[sfx])} for a "
                    f"{n}x{k} layer: config and tensors disagree; fix quantization_config or re-quantize")
            if meta["dtype"] != _HEADER_DTYPES[sfx]:
                raise fmt.FormatError(f"{file}: tensor {name}.{sfx} is {meta['dtype']}, but the GPTQ format "
                                      f"stores it as {_HEADER_DTYPES[sfx]}: re-create the checkpoint")
    return set(names)


_registered = False


def register_config() -> None:
    """Register `gptq-plugin` with vLLM (idempotent: vLLM loads plugins in every process)."""
    global _registered
    if not _registered:
        register_quantization_config(QUANT_NAME)(GPTQPluginConfig)
        _registered = True
