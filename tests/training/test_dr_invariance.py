"""Issue #28: a network trained with domain randomization sees a contrast-inverted or scalp-brightened copy of a
training case as the same tissue; one trained as long without it does not (the toy network, one phantom head, CPU).

Both arms start from one network that has learnt the phantom for 20 steps without randomization (as a pretrained
model is fine-tuned); then one arm goes on with ``DomainRandomization`` at the defaults that ``BSFTrainer_DR`` uses
(two randomized draws of the case per step), the other without it, for 20 steps. From random weights the randomized
arm needs a few hundred steps to learn the tissues at all (``bench/dr_invariance.py`` measures that, 24 minutes on
2 cores). Measured over seeds 0-5 on one core (about a minute each): the randomized arm agreed with its own
prediction at 0.55-0.96 (inverted) and 0.62-0.98 (scalp x3), the plain arm at 0.25-0.32 and 0.18-0.43.
"""
import copy
import os
import sys

import numpy as np
import torch

from bsf_nnunet.network.swin_unetr import BSFSwinUNETR
from bsf_nnunet.planning.presets import variant_arch_kwargs
from bsf_nnunet.training.domain_randomization import DomainRandomization

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from dr_invariance import copies, mean_dice, phantom, segmentation_loss, zscored  # one phantom, loss and score

SHAPE = (32, 32, 64)  # the smallest input whose deepest toy-network feature map has more than one voxel
SHARED_STEPS, ARM_STEPS, RANDOMIZED_DRAWS = 20, 20, 2


def fit(net, optimizer, image, labels, steps, randomization=None):
    """``steps`` steps of cross-entropy + Dice on the one case; with ``randomization``, a batch of
    RANDOMIZED_DRAWS randomized copies (their label maps checked unchanged)."""
    x, seg = zscored(image), torch.from_numpy(labels)[None]
    for _ in range(steps):
        if randomization is None:
            batch = x[None]
        else:
            draws = [randomization(image=x.clone(), segmentation=seg.clone()) for _ in range(RANDOMIZED_DRAWS)]
            assert all(torch.equal(d["segmentation"], seg) for d in draws)
            batch = torch.stack([d["image"] for d in draws])
        loss = segmentation_loss(net(batch), seg.long().expand(len(batch), -1, -1, -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def scores(net, image, labels) -> dict:
    """Agreement of the original's prediction with the labels, and of each copy's with the original's (mean Dice over
    CSF/GM/WM; a tissue absent from both counts 0, so a network that predicts only background agrees with nothing)."""
    with torch.no_grad():
        predicted = {name: net(zscored(c)[None]).argmax(1)[0].numpy() for name, c in copies(image, labels).items()}
    original = predicted.pop("original")
    return {"labels": mean_dice(original, labels), **{name: mean_dice(p, original) for name, p in predicted.items()}}


def test_randomized_network_sees_inverted_and_bright_scalp_copies_as_the_same_tissue():
    image, labels = phantom(np.random.default_rng(1234), SHAPE)
    torch.manual_seed(0)
    np.random.seed(0)  # the randomization draws from numpy's global generator, as in nnU-Net's workers
    shared = BSFSwinUNETR(1, 4, **variant_arch_kwargs("toy"))
    optimizer = torch.optim.AdamW(shared.parameters(), 5e-3)
    fit(shared, optimizer, image, labels, SHARED_STEPS)
    start = (copy.deepcopy(shared.state_dict()), copy.deepcopy(optimizer.state_dict()))

    results = {}
    for arm, randomization in (("plain", None), ("randomized", DomainRandomization())):
        net = BSFSwinUNETR(1, 4, **variant_arch_kwargs("toy"))
        net.load_state_dict(start[0])
        optimizer = torch.optim.AdamW(net.parameters(), 5e-3)
        optimizer.load_state_dict(start[1])
        torch.manual_seed(1)
        np.random.seed(1)
        results[arm] = scores(fit(net.train(), optimizer, image, labels, ARM_STEPS, randomization), image, labels)

    plain, randomized = results["plain"], results["randomized"]
    assert plain["labels"] > 0.85 and randomized["labels"] > 0.4, results  # both still segment the tissues
    for name in ("inverted", "scalp_x3"):
        assert randomized[name] > 0.5, results
        assert randomized[name] > plain[name] + 0.2, results
