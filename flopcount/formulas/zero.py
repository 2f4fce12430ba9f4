"""Known-zero ops: no floating-point arithmetic. Each group says why; anything not here and not
in a formula file is *uncounted* (reported by name, an error in strict mode)."""
from __future__ import annotations

import torch

from .registry import REGISTRY, known_zero

aten = torch.ops.aten

KNOWN_ZERO_GROUPS: dict[str, str] = {
    "views and metadata": (
        "view _unsafe_view reshape _reshape_alias expand expand_as t transpose permute squeeze unsqueeze "
        "slice select alias detach as_strided split split_with_sizes unbind chunk narrow unfold diagonal "
        "view_as_real view_as_complex lift lift_fresh lift_fresh_copy _conj conj resolve_conj resolve_neg "
        "_neg_view movedim unflatten flatten sym_size sym_stride sym_numel sym_storage_offset size stride "
        "is_contiguous is_same_size dim numel _has_compatible_shallow_copy_type set_ resize_ resize_as_ "
        "is_nonzero _nested_tensor_size _local_scalar_dense item _assert_async _assert_tensor_metadata "
        "_functional_assert_async _print record_stream split_copy unsqueeze_copy view_copy t_copy "
        "transpose_copy permute_copy expand_copy slice_copy select_copy detach_copy alias_copy "
        "_unsafe_index _unsafe_split is_pinned is_coalesced is_complex is_non_overlapping_and_dense "
        "is_strides_like_format"),
    "copies and casts": (
        "clone copy copy_ _copy_from _copy_from_and_resize _to_copy to contiguous _pin_memory pin_memory "
        "_foreach_copy_ _to_dense to_dense _to_sparse"),
    "creation and random numbers (random bits are not arithmetic)": (
        "empty empty_like empty_strided empty_permuted new_empty new_empty_strided zeros zeros_like ones "
        "ones_like full full_like fill fill_ zero_ _foreach_zero_ new_zeros new_ones new_full arange "
        "scalar_tensor eye linspace logspace tril triu tril_indices triu_indices rand rand_like randn "
        "randn_like randint randint_like randperm bernoulli bernoulli_ normal normal_ uniform_ "
        "exponential_ geometric_ random_ multinomial native_dropout_mask _fused_dropout "
        "one_hot _efficientzerotensor"),
    "indexing, gathering and layout (data movement)": (
        "index index_select gather scatter masked_select masked_scatter masked_fill where take "
        "index_copy index_fill nonzero nonzero_static unique _unique2 unique_consecutive cat stack "
        "constant_pad_nd pad reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d "
        "repeat repeat_interleave roll flip rot90 embedding slice_backward select_backward "
        "index_select_backward unfold_backward as_strided_scatter slice_scatter select_scatter "
        "diagonal_scatter bucketize searchsorted _pad_packed_sequence"),
    "integer and boolean bit logic (not floating point)": (
        "bitwise_and bitwise_or bitwise_xor bitwise_not bitwise_left_shift bitwise_right_shift "
        "logical_and logical_or logical_not logical_xor"),
}

# Whole namespaces without arithmetic: collectives (communication is bytes, not FLOP; their calls
# and bytes are recorded separately, see flopcount/distributed.py), profiler markers, and FSDP2's
# copy-in/copy-out ops (all_gather_copy_in, split_with_sizes_copy, chunk_cat: data movement).
ZERO_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "profiler", "fsdp")


# Ops that only Inductor's decomposed graphs contain: arange, cast, view, copy, masked gather.
INDUCTOR_ZERO = (torch.ops.prims.iota, torch.ops.prims.convert_element_type, torch.ops.prims.broadcast_in_dim,
                 torch.ops.prims.device_put, aten._unsafe_masked_index)


def _register() -> None:
    known_zero(*INDUCTOR_ZERO)
    for names in KNOWN_ZERO_GROUPS.values():
        for name in names.split():
            for candidate in (name, name + "_"):
                if hasattr(aten, candidate):
                    known_zero(getattr(aten, candidate))
    for namespace in ZERO_NAMESPACES:
        REGISTRY.add_zero_namespace(namespace)


_register()
