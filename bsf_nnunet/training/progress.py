"""progress.png for self-supervised pretraining: total and per-task losses (train and validation) and the lr."""
from __future__ import annotations

import os


def plot_ssl_progress(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(log.get("train_losses", []))
    if n == 0:
        return
    ep = list(range(n))
    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
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
    ax = axes[2]
    if log.get("lrs"):
        ax.plot(ep[:len(log["lrs"])], log["lrs"][:n], "k-", label="learning rate")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), ".tmp_progress.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
