"""Optical-flow backends for the flow stage (task ``"flow"``).

Every backend is called as ``model(img1, img2)`` with float NCHW RGB in
[0, 1] (any size; each backend pads and normalises inside) and returns, in
eval mode, the flow img1 -> img2 as (N, 2, H, W) in pixels of the input
(channel 0 = x, channel 1 = y). See :mod:`models.flownet` for the train-mode
outputs and the multi-scale loss.

Builders return random weights; :mod:`models.weights` loads checkpoints
(torchvision's bare RAFT checkpoints fit the wrappers' ``net.`` prefix).
torch is imported inside the builders, so importing this module is cheap.
"""

from __future__ import annotations

from typing import Any

from blinkflow.models.registry import register_model


@register_model("flownet_s_small", task="flow")
def flownet_s_small(*, widths: tuple[int, int, int, int, int] = (32, 64, 96, 128, 192)) -> Any:
    """The project's own FlowNetS-style net (~1.5M parameters at the default widths)."""
    from blinkflow.models.flownet import FlowNetSSmall

    return FlowNetSSmall(widths=tuple(widths))


@register_model("raft_small", task="flow", torchvision_weights="Raft_Small_Weights")
def raft_small(*, num_flow_updates: int = 12) -> Any:
    """torchvision RAFT-small (1.0M parameters); fewer ``num_flow_updates`` trade accuracy for speed."""
    from torchvision.models.optical_flow import raft_small as build

    return _wrap_raft(build(weights=None), num_flow_updates)


@register_model("raft_large", task="flow", torchvision_weights="Raft_Large_Weights")
def raft_large(*, num_flow_updates: int = 12) -> Any:
    """torchvision RAFT-large (5.3M parameters); the accurate, heavy choice."""
    from torchvision.models.optical_flow import raft_large as build

    return _wrap_raft(build(weights=None), num_flow_updates)


def _wrap_raft(net: Any, num_flow_updates: int) -> Any:
    from blinkflow.models.flownet import RaftFlow

    return RaftFlow(net, num_flow_updates=num_flow_updates)
