"""The bundle's fold ensemble (nnU-Net's): one inferer averages the class probabilities of its k fold models.

`models/model.pt` is fold 0: the network every bundle consumer loads by itself (the workflow's checkpoint loader,
MONAI Label, MONAI Deploy, the Model Zoo's checks) and hands to the inferer as `network`. The inferer holds the other
folds, loaded here from their own files (each under the zoo's size limit, which one state dict of k networks would
pass), so that every consumer that calls `inferer(inputs, network)` serves the whole ensemble.
"""

import copy
from typing import List, Sequence

import torch
from monai.inferers import Inferer


class FoldEnsembleInferer(Inferer):
    """Softmax probabilities averaged over `network` (fold 0) and the networks of `checkpoints` (the other folds),
    and with `flip_tta` over each input and its left-right mirror (mirrored back): 2k views in one forward per fold.

    `network_def`: an untrained network of the bundle's architecture, copied for each checkpoint. With no
    checkpoints this is the plain inferer of one network (metaseg's engine uses it so for a single fold model).
    """

    def __init__(self, network_def: torch.nn.Module, checkpoints: Sequence[str] = (), flip_tta: bool = False):
        super().__init__()
        self.flip_tta = flip_tta
        self.folds: List[torch.nn.Module] = []
        for path in checkpoints:
            fold = copy.deepcopy(network_def)
            fold.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.folds.append(fold.eval())
        self._device = torch.device("cpu")  # where the folds are: moved once, to the first inputs' device

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        batch = torch.cat([inputs, inputs.flip(-1)]) if self.flip_tta else inputs
        if inputs.device != self._device:
            self.folds = [fold.to(inputs.device) for fold in self.folds]
            self._device = inputs.device
        networks = [network, *self.folds]
        probs = torch.stack([torch.softmax(net(batch, *args, **kwargs), dim=1) for net in networks]).mean(0)
        if self.flip_tta:
            plain, mirrored = probs.chunk(2)
            probs = (plain + mirrored.flip(-1)) / 2
        return probs
