"""The one thing a config cannot say for U-Net++: which deep-supervision head the network returns."""

import torch
from monai.networks.nets import BasicUNetPlusPlus


class UNetPlusPlus(BasicUNetPlusPlus):
    """MONAI's BasicUNetPlusPlus, returning all heads while training and only the full-depth head otherwise.

    BasicUNetPlusPlus always returns a list, shallowest head first ([x_0_1, ..., x_0_4]). Training needs every head
    for DeepSupervisionLoss; validation, export and serving need the last one as a plain tensor. The state dict is
    the parent's, so `models/model.pt` loads into either class.
    """

    def forward(self, x: torch.Tensor):
        heads = super().forward(x)
        return heads if self.training else heads[-1]
