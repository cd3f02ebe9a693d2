"""Cost-based admission: what a request costs, and the per-request budget it must fit in.

A request's cost is the map-resolution pixels it pushes through the network, in megapixels:
maps x H x W of the maps after ?resize= (/encode, /reconstruct), or latents x h x w x f^2 of
the maps they decode to (/decode); a tiled request computes its tiles, so it costs maps x
tiles x tile pixels (overlaps counted as often as they are computed). Each inference worker
times its endpoint once at start (the warm-up), giving seconds per megapixel; the budget is the cost that fits in
BUDGET_FRACTION of the request deadline (--timeout) at that speed, unless --max-request-cost
sets it. The HTTP processes refuse an over-budget request with 413 before it is queued, and a
worker forms its batches under the same budget (server/apis.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from . import metrics
from runtime.tiling import Tiler

from .protocol import RequestError
from .settings import Settings

# The share of --timeout one request (and one batch) may take at the measured speed; the rest
# is left for the queue and for sizes the warm-up speed underestimates (the mid-block
# attention grows with the square of a latent's pixels).
BUDGET_FRACTION = 0.5
MEGA = 1e6


def cost_megapixels(count: int, hw: tuple[int, int], factor: int = 1,
                    tiler: Optional[Tiler] = None) -> float:
    """Map-resolution megapixels of `count` arrays of size `hw` (latents: factor f); run
    through `tiler`, what its tiles compute: tiles x tile pixels per map."""
    h, w = int(hw[0]) * factor, int(hw[1]) * factor
    if tiler is None:
        return count * h * w / MEGA
    return count * tiler.count(h, w) * min(h, tiler.tile) * min(w, tiler.tile) / MEGA


@dataclass(frozen=True)
class BudgetPolicy:
    """How a worker turns its measured speed into a per-request budget."""
    timeout: float
    override: Optional[float] = None  # megapixels, from --max-request-cost

    @classmethod
    def of(cls, settings: Settings) -> "BudgetPolicy":
        return cls(settings.timeout, settings.max_request_cost)

    def megapixels(self, seconds_per_megapixel: float, floor: float) -> float:
        """The budget: the override, else what fits in the deadline's share, but never less
        than `floor` (one warm-up-size map: a server must be able to serve that)."""
        if self.override is not None:
            return self.override
        return max(BUDGET_FRACTION * self.timeout / seconds_per_megapixel, floor)


UNBOUNDED = BudgetPolicy(float("inf"))  # no deadline: every request fits (direct use, tests)


def check_cost(path: str, count: int, hw: tuple[int, int], factor: int, budget: float,
               tiler: Optional[Tiler] = None) -> None:
    """413 when `count` arrays of size `hw` (through `tiler`) cost more than `budget`
    megapixels."""
    cost = cost_megapixels(count, hw, factor, tiler)
    if cost <= budget:
        return
    h, w = int(hw[0]) * factor, int(hw[1]) * factor
    tiles = f", each computed as {tiler.count(h, w)} tiles of {tiler.tile}" if tiler else ""
    metrics.reject(path, "over_budget")
    raise RequestError(
        413, f"{path}: this request costs {cost:.4g} megapixels of compute ({count} x {h}x{w} "
             f"output maps{tiles}) and the per-request budget is {budget:.4g} megapixels (GET "
             "/info: budget); send fewer maps per request, or a smaller ?resize=",
        fields={"cost_megapixels": round(cost, 6), "budget_megapixels": round(budget, 6)})


def endpoint_budget(workers: Iterable[dict], path: str) -> float:
    """The budget of `path`: the smallest its workers published; 503 before any has."""
    budgets = [w["budget_megapixels"] for w in workers
               if w.get("endpoint") == path and "budget_megapixels" in w]
    if not budgets:
        raise RequestError(503, f"{path}: its inference worker is still warming up (the "
                                "request budget is measured then); retry shortly",
                           headers={"Retry-After": "1"})
    return min(budgets)


def budget_report(workers: Iterable[dict], policy: BudgetPolicy) -> dict:
    """For GET /info: how budgets are set, and each endpoint's measured speed and budget."""
    endpoints: dict[str, dict] = {}
    for w in sorted(workers, key=lambda w: w["endpoint"]):
        entry = endpoints.setdefault(w["endpoint"], {"seconds_per_megapixel": 0.0,
                                                     "budget_megapixels": float("inf")})
        entry["seconds_per_megapixel"] = max(entry["seconds_per_megapixel"],
                                             w["seconds_per_megapixel"])
        entry["budget_megapixels"] = min(entry["budget_megapixels"], w["budget_megapixels"])
    return {"unit": "megapixels of output maps per request (maps x H x W; tiled: maps x tiles "
                    "x tile pixels)",
            "fraction_of_timeout": BUDGET_FRACTION, "timeout": policy.timeout,
            "max_request_cost": policy.override, "endpoints": endpoints}
