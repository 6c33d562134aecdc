"""Pictures the CLI writes: the denoising trajectory strip (matplotlib, Agg backend).

Sample grids reuse :func:`scoresde.training.save_sample_grid`.
"""

from __future__ import annotations

from pathlib import Path
import torch


def pick_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)``, first and last included."""
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def trajectory_strip(
    times: torch.Tensor,
    xs: torch.Tensor,
    x0s: torch.Tensor,
    path: Path,
    *,
    columns: int = 8,
    rows: int = 4,
) -> None:
    """Save ``x_t`` and the denoised estimate ``x̂0`` at ``columns`` times as one PNG.

    ``xs``, ``x0s``: ``(S, B, ...)`` states and estimates at the ``S`` reported steps, ``times`` ``(S,)``;
    the columns are ``columns`` entries spread evenly from the first to the last, so a trajectory
    that starts with ``x_T`` (the prior draw) shows it in the first column. Pixels are drawn as
    nearest-neighbour blocks, and the strip is at least 260 px wide.
    Images ``(C, H, W)`` in [-1, 1]: for each of the first ``rows`` samples, a row of ``x_t`` and a row
    of ``x̂0``. Vectors: one scatter of all samples per time, ``x_t`` above ``x̂0``. A sampler that
    reports no estimate at a step (NaN) leaves that panel blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = pick_indices(xs.shape[0], columns)
    xs, x0s = xs.detach().float().cpu(), x0s.detach().float().cpu()
    image = xs.ndim == 5
    n_rows = 2 * min(rows, xs.shape[1]) if image else 2
    # at least 2.6 in (260 px at 100 dpi) wide, whatever the number of reported steps
    fig, axes = plt.subplots(n_rows, len(cols), figsize=(max(1.3 * len(cols), 2.6), 1.3 * n_rows + 0.4), squeeze=False)
    for j, s in enumerate(cols):
        axes[0][j].set_title(f"t={float(times[s]):.3g}", fontsize=8)
        for r in range(n_rows):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            source = xs if r % 2 == 0 else x0s
            if image:
                img = source[s, r // 2]
                if bool(torch.isnan(img).all()):  # no estimate at this time (x_T): an empty cell
                    ax.axis("off")
                    continue
                img = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")  # 8x8 pixels stay sharp blocks, never blurred
            else:
                pts = source[s].reshape(source.shape[1], -1)
                if bool(torch.isnan(pts).all()):
                    ax.axis("off")
                    continue
                ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else torch.zeros(len(pts)), s=1)
            if j == 0:
                ax.set_ylabel("x_t" if r % 2 == 0 else "x̂0", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

