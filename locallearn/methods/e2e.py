"""End-to-end backpropagation: the whole network as one block, trained through the same engine.

Running the baseline through the local-learning engine (as InfoPro treats ``local_module_num=1``) means memory and
speed comparisons share one code path.
"""

from locallearn.errors import UserError
from locallearn.methods.base import LocalMethod, SetupInfo, register_method


@register_method("e2e")
class EndToEnd(LocalMethod):
    """Plain backprop: K must be 1, and the loss is cross-entropy on the network's classifier."""

    def build_aux(self, info: SetupInfo) -> None:
        if len(info.blocks) != 1:
            raise UserError(
                f"method e2e trains the whole network as one block, but K={len(info.blocks)}: "
                "use --K 1, or a local method (dgl, ...) for K > 1"
            )
