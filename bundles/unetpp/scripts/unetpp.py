"""The one thing a config cannot say for U-Net++: which deep-supervision head the network returns."""

import types
from typing import List, Union

import torch
from monai.networks.nets import BasicUNetPlusPlus


class UNetPlusPlus(BasicUNetPlusPlus):
    """MONAI's BasicUNetPlusPlus, returning all heads while training and only the full-depth head otherwise.

    BasicUNetPlusPlus always returns a list, shallowest head first ([x_0_1, ..., x_0_4]). Training needs every head
    for DeepSupervisionLoss; validation, export and serving need the last one as a plain tensor. The state dict is
    the parent's, so `models/model.pt` loads into either class.

    It scripts (MONAI's `ckpt_export`, the model zoo's TorchScript check): TorchScript compiles no `super()`, so the
    parent's forward is also this class's method `heads`, and the two results are a Union.
    """

    # MONAI's forward under its own name: TorchScript compiles a called method under its function's __name__, so a
    # plain alias would be a second `forward`.
    heads = types.FunctionType(BasicUNetPlusPlus.forward.__code__, BasicUNetPlusPlus.forward.__globals__, "heads")

    def forward(self, x: torch.Tensor) -> Union[List[torch.Tensor], torch.Tensor]:
        heads = self.heads(x)
        if self.training:
            return heads
        return heads[-1]
