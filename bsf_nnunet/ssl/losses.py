"""Losses of BrainSegFounder's self-supervised recipe: rotation (cross-entropy), contrastive (NT-Xent) and
reconstruction (L1), as in MONAI's Swin-UNETR pretraining.

``nt_xent`` uses the local batch's negatives by default, as the paper did (each GPU's own crops). With
``gather=True`` under ``torch.distributed`` it gathers the embeddings of all ranks, so the negatives come from the
global batch (useful at scale; ``BSFPretrainTrainer.bsf_contrastive_gather``). The gather is differentiable: its
backward sums the incoming gradients over ranks (``all_reduce``) and returns this rank's slice. Every rank computes
the same global loss value; the gradient reaching its local embeddings is ``world_size`` times its share of the
global loss's gradient, which is exactly what ``DistributedDataParallel`` expects since it averages parameter
gradients over ranks (after averaging, the update equals single-process training on the concatenated batch). All
ranks must pass the same number of embeddings.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGather(torch.autograd.Function):
    """Concatenate a tensor over ranks along dim 0; backward: sum of gradients over ranks, local slice."""

    @staticmethod
    def forward(ctx, x, group=None):
        world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 (rank order), differentiable; ``x`` itself when not
    distributed."""
    if not _distributed():
        return x
    return _AllGather.apply(x, group)


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation classification."""
    return F.cross_entropy(logits.float(), labels.long())


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all voxels."""
    return F.l1_loss(pred.float(), target.float())


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR) loss between two views' embeddings z1, z2 (N, D): z1[i] and z2[i] are a positive pair.

    With z = the 2N L2-normalised embeddings and s_ij = cos(z_i, z_j) / temperature, each of the 2N anchors
    contributes -log(exp(s_ip) / sum_{j != i} exp(s_ij)) (its positive plus 2N - 2 negatives); the loss is the mean.
    With ``gather`` under torch.distributed (world size > 1), N is the global batch (see the module docstring)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    if gather:
        z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    n = z1.shape[0]
    z = torch.cat([z1, z2], 0)
    with torch.autocast(z.device.type, enabled=False):
        sim = z @ z.t() / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    idx = torch.arange(2 * n, device=z.device)
    pos = sim[idx, (idx + n) % (2 * n)]
    return (torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1) - pos).mean()


@torch.no_grad()
def ssl_metrics(rot_logits: torch.Tensor, rot_labels: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> dict:
    """What the SSL losses alone do not show: ``rot_acc``, the fraction of views whose rotation is classified right
    (chance 0.25), and ``con_top1``, the fraction of the 2N embeddings whose most similar other embedding is their
    partner view (chance 1 / (2N - 1)). Local batch, detached floats."""
    acc = (rot_logits.argmax(1) == rot_labels).float().mean()
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = (z @ z.t()).fill_diagonal_(float("-inf"))
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    top1 = (sim.argmax(1) == partner).float().mean()
    return {"rot_acc": float(acc), "con_top1": float(top1)}


class SSLLoss(nn.Module):
    """w_rot * CE(rotation) + w_con * NT-Xent(z1, z2) + w_rec * L1(reconstruction).

    ``forward(rot_logits, rot_labels, z1, z2, reconstruction, target)`` -> (total, {"rot", "con", "rec"}) where the
    per-task values are the unweighted losses, detached."""

    def __init__(self, w_rot: float = 1.0, w_con: float = 1.0, w_rec: float = 1.0, temperature: float = 0.5,
                 gather: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.w_rot, self.w_con, self.w_rec = float(w_rot), float(w_con), float(w_rec)
        self.temperature = float(temperature)
        self.gather = bool(gather)

    def forward(self, rot_logits, rot_labels, z1, z2, reconstruction, target):
        rot = rotation_loss(rot_logits, rot_labels)
        con = nt_xent(z1, z2, self.temperature, self.gather)
        rec = reconstruction_loss(reconstruction, target)
        total = self.w_rot * rot + self.w_con * con + self.w_rec * rec
        return total, {"rot": rot.detach(), "con": con.detach(), "rec": rec.detach()}
