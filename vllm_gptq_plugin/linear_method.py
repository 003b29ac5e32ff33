"""The vLLM linear method for GPTQ layers: create_weights / process_weights_after_loading / apply.

Parameters keep the checkpoint layout (vllm_gptq_plugin.format) and use vLLM's parameter classes, so
vLLM's column-, row-, merged- and QKV-parallel loaders shard them under tensor parallelism:

    qweight [K/p * b/32, N/p] int32   PackedvLLMParameter   input_dim 0 (packed), output_dim 1
    qzeros  [G', N/p * b/32] int32    packed along output_dim 1
    scales  [G', N/p]                 in the model dtype
    g_idx   [S * K/p] int32           one K-vector per logical shard S (q/k/v, gate/up), see GIdxParameter

G' is the local number of groups: a row-parallel layer (K split across ranks) without act-order gets
its own K/p/group_size groups (g_idx is rebased to them after loading); with act-order (desc_act) the
groups of a K-slice lie anywhere, so every rank keeps all G groups and the full g_idx slice indexes them.

process_weights_after_loading checks the loaded values (finite scales, g_idx within the groups,
symmetric zero points: format.check_layer_values, one pass over the small tensors, never qweight),
then hands the tensors to vllm_gptq_plugin.kernels.prepare once (it repacks for the device's kernel);
apply calls kernels.gptq_gemm.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin import kernels


class GIdxParameter(RowvLLMParameter):
    """g_idx for every logical shard of a (possibly fused) layer: data [S * K_local].

    vLLM's own GPTQ keeps one g_idx per fused layer and lets the last shard loaded win, which is
    wrong when q/k/v (or gate/up) were quantized with different act-order permutations. Here each
    shard's g_idx goes to its own slot; row parallelism takes this rank's K-slice.
    """

    def __init__(self, num_shards: int, **kwargs):
        self.num_shards = num_shards
        super().__init__(input_dim=0, **kwargs)

    def _slot(self, i: int) -> torch.Tensor:
        k = self.data.shape[0] // self.num_shards
        return self.data[i * k:(i + 1) * k]

    def _load_all(self, loaded_weight: torch.Tensor) -> None:
        for i in range(self.num_shards):
            self._slot(i).copy_(loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        k = self.data.shape[0]
        self._load_all(loaded_weight.narrow(0, self.tp_rank * k, k))

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load_all(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        shard_id = kwargs.get("shard_id")
        if shard_id is None:
            self._load_all(loaded_weight)
        else:
            self._slot(self._shard_id_as_int(shard_id)).copy_(loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self.load_merged_column_weight(loaded_weight, **kwargs)


@register_weight_loader_v2_supported_method
class GPTQPluginLinearMethod(LinearMethodBase):
    """One quantized linear layer (settings already resolved for this module by the config).

    `sources` names, per logical shard (q/k/v of a fused qkv_proj), the checkpoint module and the file
    holding it, for the messages of the load-time value checks."""

    def __init__(self, qcfg: fmt.QuantConfig, sources: list[tuple[str, str]] | None = None):
        self.qcfg = qcfg
        self.sources = sources

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        bits, group_size = self.qcfg.bits, self.qcfg.group_size
        weight_loader = extra_weight_attrs.get("weight_loader")
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        pack_factor = Fraction(32, bits)  # values per int32 word (3 bits: 32 values in 3 words)
        for n in output_partition_sizes:
            if n * bits % 32:
                raise fmt.FormatError(
                    f"{layer.__class__.__name__}: an output shard of {n} columns cannot hold whole "
                    f"{bits}-bit words; tensor parallelism must split output features in multiples of "
                    f"{32 // math.gcd(32, bits)}: use a smaller --tensor-parallel-size")
        if k_local * bits % 32:
            raise fmt.FormatError(
                f"{layer.__class__.__name__}: an input shard of {k_local} rows cannot hold whole {bits}-bit "
                "words: use a smaller --tensor-parallel-size")
        full_groups = fmt.num_groups(input_size, group_size)
        row_parallel = k_local != input_size
        # Shard the groups with K only when each rank's slice holds whole groups in order.
        shard_groups = (row_parallel and group_size != -1 and not self.qcfg.desc_act
                        and k_local % group_size == 0)
        groups = k_local // group_size if shard_groups else full_groups

        qweight = PackedvLLMParameter(
            data=torch.empty(k_local * bits // 32, n_local, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=pack_factor, weight_loader=weight_loader)
        zeros_data = torch.empty(groups, n_local * bits // 32, dtype=torch.int32)
        scales_data = torch.empty(groups, n_local, dtype=params_dtype)
        if shard_groups:
            qzeros = PackedvLLMParameter(data=zeros_data, input_dim=0, output_dim=1, packed_dim=1,
                                         packed_factor=pack_factor, weight_loader=weight_loader)
            scales = GroupQuantScaleParameter(data=scales_data, input_dim=0, output_dim=1,
                                              weight_loader=weight_loader)
        else:  # every rank keeps all groups (act-order, or no row parallelism)
            qzeros = PackedColumnParameter(data=zeros_data, output_dim=1, packed_dim=1,
                                           packed_factor=pack_factor, weight_loader=weight_loader)
            scales = ChannelQuantScaleParameter(data=scales_data, output_dim=1, weight_loader=weight_loader)
        g_idx = GIdxParameter(num_shards=len(output_partition_sizes),
                              data=torch.empty(len(output_partition_sizes) * k_local, dtype=torch.int32),
                              weight_loader=weight_loader)
        for name, param in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            layer.register_parameter(name, param)
        layer.gptq_output_partition_sizes = list(output_partition_sizes)
        layer.gptq_group_offset = (qweight.tp_rank * groups) if shard_groups else 0
        layer.gptq_local_groups = groups
        layer.gptq_shard_groups = shard_groups

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        sizes = layer.gptq_output_partition_sizes
        k = layer.g_idx.shape[0] // len(sizes)
        g_idx = layer.g_idx.data.view(len(sizes), k) - layer.gptq_group_offset
        qweight, qzeros, scales = layer.qweight.data, layer.qzeros.data, layer.scales.data
        self.check_values(layer, g_idx, qzeros, scales)
        prepare = dict(bits=self.qcfg.bits, checkpoint_format=self.qcfg.checkpoint_format,
                       dtype=scales.dtype)
        if all(torch.equal(g_idx[0], g) for g in g_idx[1:]):
            parts = [kernels.prepare(qweight, qzeros, scales, g_idx[0].contiguous(), **prepare)]
        else:  # fused shards quantized with different act-order permutations: one GEMM per shard
            parts, n0 = [], 0
            for i, n in enumerate(sizes):
                z0, zn = n0 * self.qcfg.bits // 32, n * self.qcfg.bits // 32
                parts.append(kernels.prepare(
                    qweight[:, n0:n0 + n].contiguous(), qzeros[:, z0:z0 + zn].contiguous(),
                    scales[:, n0:n0 + n].contiguous(), g_idx[i].contiguous(), **prepare))
                n0 += n
        layer.gptq_weights = parts
        # The kernel owns the (re)packed tensors now; drop the checkpoint-layout copies.
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)

    def check_values(self, layer: torch.nn.Module, g_idx: torch.Tensor, qzeros: torch.Tensor,
                     scales: torch.Tensor) -> None:
        """What the config-time header checks cannot see, on the tensors vLLM has just loaded: one
        pass over each shard's scales, qzeros and g_idx (never qweight), before any kernel reads them."""
        sources = self.sources or [(f"{layer.__class__.__name__} shard {i}", "the checkpoint")
                                   for i in range(len(g_idx))]
        hint = ""
        if layer.gptq_shard_groups:  # this rank holds only its K-slice's groups: sorted g_idx assumed
            hint = (f" (on this tensor-parallel rank, shifted by {layer.gptq_group_offset}): the checkpoint "
                    "looks act-order (g_idx not sorted) but its config says desc_act: false; set desc_act: "
                    "true in quantization_config")
        n0 = 0
        for (name, file), n, shard_g_idx in zip(sources, layer.gptq_output_partition_sizes, g_idx):
            z0, zn = n0 * self.qcfg.bits // 32, n * self.qcfg.bits // 32
            fmt.check_layer_values(name, file, scales[:, n0:n0 + n], qzeros[:, z0:z0 + zn], shard_g_idx,
                                   layer.gptq_local_groups, self.qcfg.bits, self.qcfg.sym,
                                   self.qcfg.checkpoint_format, g_idx_hint=hint)
            n0 += n

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.gptq_weights
        if len(parts) == 1:
            return kernels.gptq_gemm(x, parts[0], bias)
        out = torch.cat([kernels.gptq_gemm(x, w) for w in parts], dim=-1)
        return out if bias is None else out + bias
