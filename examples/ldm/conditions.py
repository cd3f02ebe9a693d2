"""RadioDiff's condition (building mask + transmitter map) brought to latent resolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS = 3  # building share, transmitter cell, log distance to the transmitter


def condition_maps(buildings: torch.Tensor, tx: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, 3, H/f, W/f] from [N, 1, H, W] maps in [0, 1]: the share of each latent cell that is
    building, the cell holding the transmitter, and log(1 + distance to it in cells) / 4 (a
    fixed function of the transmitter map: it spares the small UNet learning distances)."""
    cells = F.avg_pool2d(buildings.float(), factor)
    tx_cell = F.max_pool2d(tx.float(), factor)
    n, _, h, w = tx_cell.shape
    flat = tx_cell.flatten(1).argmax(1)
    ty, tx_ = (flat // w).float(), (flat % w).float()
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    dist = ((yy - ty.view(n, 1, 1)) ** 2 + (xx - tx_.view(n, 1, 1)) ** 2).sqrt()
    return torch.cat([cells, tx_cell, (torch.log1p(dist) / 4)[:, None]], 1)
