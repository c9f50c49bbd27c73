"""progress.png for self-supervised pretraining: total and per-task losses, rotation accuracy and contrastive top-1
(train and validation), and the lr."""
from __future__ import annotations

from ..io import atomic_path


def plot_ssl_progress(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(log.get("train_losses", []))
    if n == 0:
        return
    ep = list(range(n))
    fig, axes = plt.subplots(4, 1, figsize=(10, 14))
    ax = axes[0]
    ax.plot(ep, log["train_losses"][:n], "b-", label="train total")
    if log.get("val_losses"):
        ax.plot(ep[:len(log["val_losses"])], log["val_losses"][:n], "r-", label="val total")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[1]
    for k, c in (("rot", "C0"), ("con", "C1"), ("rec", "C2")):
        if log.get(f"ssl_{k}"):
            ax.plot(ep[:len(log[f"ssl_{k}"])], log[f"ssl_{k}"][:n], color=c, label=f"train {k}")
        if log.get(f"val_ssl_{k}"):
            ax.plot(ep[:len(log[f"val_ssl_{k}"])], log[f"val_ssl_{k}"][:n], color=c, ls="--", label=f"val {k}")
    ax.set_ylabel("per-task loss")
    ax.legend(ncol=3)
    _plot_accuracies(axes[2], log, ep, n)
    ax = axes[3]
    if log.get("lrs"):
        ax.plot(ep[:len(log["lrs"])], log["lrs"][:n], "k-", label="learning rate")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary ends in .png: matplotlib picks the format by it
        fig.savefig(tmp)
    plt.close(fig)


def _plot_accuracies(ax, log: dict, ep: list, n: int) -> None:
    """Rotation accuracy (chance 0.25) and contrastive top-1, train solid and validation dashed."""
    for k, c, label in (("rot_acc", "C0", "rotation accuracy"), ("con_top1", "C1", "contrastive top-1")):
        for prefix, ls in (("", "-"), ("val_", "--")):
            values = log.get(f"{prefix}ssl_{k}")
            if values:
                ax.plot(ep[:len(values)], values[:n], color=c, ls=ls, label=f"{prefix or 'train '}{label}".replace(
                    "val_", "val "))
    ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="rotation chance")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction right")
    ax.legend(ncol=2)
