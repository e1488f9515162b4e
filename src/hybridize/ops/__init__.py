"""Math kernels: gated delta rule (chunked / recurrent / fla dispatch) and the causal short conv.

Every fast path has a float64 per-token specification in :mod:`hybridize.ops.naive`.
"""

from .conv import causal_conv1d
from .delta_rule import (
    all_states_gated_delta_rule,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
    unit_lower_inverse,
)
from .dispatch import fla_available, fla_status, gated_delta_net, gated_delta_rule, short_conv
from .naive import naive_causal_conv1d, naive_gated_delta_rule

__all__ = [
    "all_states_gated_delta_rule",
    "causal_conv1d",
    "chunk_gated_delta_rule",
    "fla_available",
    "fla_status",
    "gated_delta_net",
    "gated_delta_rule",
    "naive_causal_conv1d",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "short_conv",
    "unit_lower_inverse",
]
