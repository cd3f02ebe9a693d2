"""Cost-based admission: what a request costs, and the per-request budget it must fit in.

A request's cost is the map-resolution pixels it pushes through the network, in megapixels:
maps x H x W of the maps after ?resize= (/encode, /reconstruct), or latents x h x w x f^2 of
the maps they decode to (/decode); a tiled request computes its tiles, so it costs maps x
tiles x tile pixels (overlaps counted as often as they are computed). A pixel of a larger pass
costs more (the mid-block attention grows with the square of the latent's pixels, larger
activations leave the caches) or less (a small warm-up is dominated by per-call overheads): a
pass of P megapixels costs P x (1 + growth x (P - P0)), P0 the warm-up map's megapixels and
`growth` measured at start from a second warm-up at the largest whole pass the server runs
(--max-pixels, at most 4x the warm-up's side); past it a cost grows on and is never
extrapolated cheaper. Each inference worker records its speed once per machine
(server/speed.py), giving seconds per megapixel at the warm-up size; the budget is the cost
that fits in BUDGET_FRACTION of the request deadline (--timeout) at that speed, unless
--max-request-cost sets it. The HTTP processes refuse an over-budget request with 413 before it is queued, and a
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


@dataclass(frozen=True)
class Budget:
    """An endpoint's per-request budget and how its cost changes with the size of a pass."""
    megapixels: float
    growth: float = 0.0  # per megapixel above `reference` (see the module); < 0: cheaper
    reference: float = 0.0  # the warm-up map's megapixels
    measured_to: float = 0.0  # the larger warm-up's megapixels: the end of the measured range
    max_pass: float = float("inf")  # the largest pass whose working memory fits in all there is
    pass_maps: int = 1 << 30  # maps a forward pass holds at most (--max-batch-size)

    def pass_cost(self, megapixels: float) -> float:
        """Warm-up-speed megapixels of one pass: interpolated between the two warm-ups;
        beyond the larger one it grows on, and is never cheaper than at the warm-up."""
        above = max(megapixels - self.reference, 0.0)
        factor = 1.0 + self.growth * above
        if megapixels > self.measured_to:  # unmeasured: never cheaper than the warm-up's pixel
            factor = max(factor, 1.0)
        return megapixels * factor


UNLIMITED = Budget(float("inf"))


def cost_megapixels(count: int, hw: tuple[int, int], factor: int = 1,
                    tiler: Optional[Tiler] = None, budget: Budget = UNLIMITED) -> float:
    """The cost of `count` arrays of size `hw` (latents: factor f): map-resolution megapixels
    per pass, grown as `budget` says; run through `tiler`, its passes are the tiles."""
    passes = 1 if tiler is None else tiler.count(int(hw[0]) * factor, int(hw[1]) * factor)
    return count * passes * pass_megapixels(hw, factor, tiler, budget)


def pass_megapixels(hw: tuple[int, int], factor: int = 1, tiler: Optional[Tiler] = None,
                    budget: Budget = UNLIMITED) -> float:
    """The cost of one map's largest forward pass: the whole map, or one tile of it."""
    h, w = int(hw[0]) * factor, int(hw[1]) * factor
    if tiler is not None:
        h, w = min(h, tiler.tile), min(w, tiler.tile)
    return budget.pass_cost(h * w / MEGA)


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


def check_cost(path: str, count: int, hw: tuple[int, int], factor: int, budget: Budget,
               tiler: Optional[Tiler] = None) -> None:
    """413 when `count` arrays of size `hw` (through `tiler`) cost more than `budget`, or when
    their largest pass needs more working memory than the worker has in all."""
    cost = cost_megapixels(count, hw, factor, tiler, budget)
    h, w = int(hw[0]) * factor, int(hw[1]) * factor
    tiles = f", each computed as {tiler.count(h, w)} tiles of {tiler.tile}" if tiler else ""
    if cost > budget.megapixels:
        _refuse(path, "over_budget", cost, budget.megapixels,
                f"this request costs {cost:.4g} megapixels of compute ({count} x {h}x{w} output "
                f"maps{tiles}) and the per-request budget is {budget.megapixels:.4g} megapixels "
                "(GET /info: budget); send fewer maps per request, or a smaller ?resize=")
    maps = min(count, budget.pass_maps)
    if tiler is not None:
        h, w = min(h, tiler.tile), min(w, tiler.tile)
    largest = maps * pass_megapixels(hw, factor, tiler, budget)
    if largest > budget.max_pass:
        _refuse(path, "over_memory", largest, budget.max_pass,
                f"this request's largest forward pass ({maps} x {h}x{w}) costs {largest:.4g} "
                f"megapixels, and the working memory of at most {budget.max_pass:.4g} fits in "
                "all the memory the worker has (the machine's or its container's); send fewer "
                "maps per request, or ?tiled=true")


def _refuse(path: str, reason: str, cost: float, limit: float, detail: str) -> None:
    """Count the refusal and raise its 413, with the cost and the limit it passed."""
    metrics.reject(path, reason)
    raise RequestError(413, f"{path}: {detail}",
                       fields={"cost_megapixels": round(cost, 6),
                               "budget_megapixels": round(limit, 6)})


def endpoint_budget(workers: Iterable[dict], path: str) -> Budget:
    """The budget of `path`: the smallest its workers published, with the steepest growth;
    503 before any has."""
    mine = [w for w in workers if w.get("endpoint") == path and "budget_megapixels" in w]
    if not mine:
        raise RequestError(503, f"{path}: its inference worker is still warming up (the "
                                "request budget is measured then); retry shortly",
                           headers={"Retry-After": "1"})
    steepest = max(mine, key=lambda w: w.get("cost_growth_per_megapixel", 0.0))
    return Budget(min(w["budget_megapixels"] for w in mine),
                  steepest.get("cost_growth_per_megapixel", 0.0),
                  steepest.get("warmup_megapixels", 0.0),
                  steepest.get("growth_measured_to_megapixels", 0.0),
                  min(w.get("max_pass_megapixels") or float("inf") for w in mine),
                  min(w.get("pass_maps", 1 << 30) for w in mine))


def client_share(workers: Iterable[dict], path: str, timeout: float) -> float:
    """Megapixels the endpoint's workers compute in `timeout` seconds at their measured speed
    (the slowest worker's, times their number): the most one client may have in progress, since
    more of its requests would time out anyway; unbounded before any worker has measured."""
    rates = [w["seconds_per_megapixel"] for w in workers
             if w.get("endpoint") == path and w.get("seconds_per_megapixel")]
    return len(rates) * timeout / max(rates) if rates else float("inf")


def budget_report(workers: Iterable[dict], policy: BudgetPolicy) -> dict:
    """For GET /info: how budgets are set, and each endpoint's measured speed and budget."""
    endpoints: dict[str, dict] = {}
    for w in sorted(workers, key=lambda w: w["endpoint"]):
        entry = endpoints.setdefault(w["endpoint"], {"seconds_per_megapixel": 0.0,
                                                     "budget_megapixels": float("inf")})
        entry["seconds_per_megapixel"] = max(entry["seconds_per_megapixel"],
                                             w["seconds_per_megapixel"])
        entry["budget_megapixels"] = min(entry["budget_megapixels"], w["budget_megapixels"])
        entry["cost_growth_per_megapixel"] = max(entry.get("cost_growth_per_megapixel", -1e9),
                                                 w.get("cost_growth_per_megapixel", 0.0))
    return {"unit": "megapixels of output maps per request (maps x H x W; tiled: maps x tiles "
                    "x tile pixels), a pass of P megapixels counted as P x (1 + growth x (P - "
                    "the warm-up's megapixels)) above the warm-up size",
            "fraction_of_timeout": BUDGET_FRACTION, "timeout": policy.timeout,
            "max_request_cost": policy.override, "endpoints": endpoints}
