"""Facts about the Ray cluster a run goes to, shared by the trainer (in the driver) and `raysft submit` (a client)."""

from __future__ import annotations

import json
import re
from typing import Any

# The node type Ray's read-only autoscaler (a cluster without autoscaling) gives every node: node_<id>.
_READ_ONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")


def autoscaler_adds_nodes(status: str | bytes | dict[str, Any] | None) -> bool:
    """Whether the autoscaler status Ray keeps in the GCS (`DEBUG_AUTOSCALING_STATUS`, also served by the
    dashboard's /api/cluster_status) comes from an autoscaler that can add nodes.

    The v1 monitor runs on every cluster and reports its node types; without an autoscaling config it names each
    node `node_<id>`, with one the config's type names (e.g. `gpu_1x_a10g`).

    Example:
        >>> autoscaler_adds_nodes({"autoscaler_report": {"node_type_mapping": {"10.0.0.1": "ray.head.default"}}})
        True
    """
    report = (json.loads(status) if isinstance(status, (str, bytes)) else status or {}).get("autoscaler_report")
    node_types = (report or {}).get("node_type_mapping") or {}
    return any(not _READ_ONLY_NODE_TYPE.match(node_type) for node_type in node_types.values())
