"""``spec.aggregation``: the robust rule and its settings, a block of the typed spec (``p2ptrain.spec``).

Defaults and rules live in the CRD (``crds/``) like every field's; this module only gives them types.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2ptrain.schema import crd_default


@dataclass(frozen=True)
class AggregationSpec:
    rule: str = crd_default("aggregation.rule")
    byzantine: int = crd_default("aggregation.byzantine")
    multi_krum_select: int | None = None
    # Worker momentum (p2ptrain.momentum): what honest peers publish is m = momentum*m + g, not g.
    momentum: float = crd_default("aggregation.momentum")
    # centered-clipping's radius; the other rules have no use for it.
    radius: float = crd_default("aggregation.radius")
