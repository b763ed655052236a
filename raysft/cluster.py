"""Facts about the Ray cluster a run goes to, shared by the trainer (in the driver) and `raysft submit` (a client)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# The node type Ray's read-only autoscaler (a cluster without autoscaling) gives every node: node_<id>.
_READ_ONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")


def autoscaler_adds_nodes(node_types: Mapping[str, str] | None) -> bool:
    """Whether the autoscaler reporting these node types (node IP -> type) can add nodes.

    The v1 monitor runs on every cluster and reports its node types; without an autoscaling config it names each
    node `node_<id>`, with one the config's type names (e.g. `gpu_1x_a10g`).

    Example:
        >>> autoscaler_adds_nodes({"10.0.0.1": "ray.head.default"}), autoscaler_adds_nodes({"10.0.0.1": "node_4f2a"})
        (True, False)
    """
    return any(not _READ_ONLY_NODE_TYPE.match(node_type) for node_type in (node_types or {}).values())


def gcs_node_types(status: str | bytes | None) -> dict[str, str]:
    """The node types in the autoscaler status Ray keeps in the GCS (`DEBUG_AUTOSCALING_STATUS`, JSON)."""
    report = json.loads(status).get("autoscaler_report") if status else None
    return dict((report or {}).get("node_type_mapping") or {})


def dashboard_node_types(answer: Mapping[str, Any]) -> dict[str, str]:
    """The same from the dashboard's /api/cluster_status answer (`data`), which camelCases every key."""
    report = (answer.get("clusterStatus") or {}).get("autoscalerReport") or {}
    return dict(report.get("nodeTypeMapping") or {})
