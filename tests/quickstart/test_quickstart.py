"""The README's first command, end to end: SmolLM2-135M-Instruct from PyPI, LoRA, before/after (slow tier)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysft.errors import ConfigError
from raysft.quickstart import run_quickstart


@pytest.mark.slow
def test_quickstart_really_improves_the_task(tmp_path: Path) -> None:
    import ray

    try:
        summary = run_quickstart(tmp_path, overrides=[])
    finally:
        # The quickstart starts a local Ray in this process; later slow tests start their own in subprocesses,
        # and two local Rays on one machine confuse Ray Train's placement-group cleanup.
        ray.shutdown()
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["exact_match_after"] >= summary["exact_match_before"] + 0.3
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()

    # Run again in the same folder: refused at once, naming --output-dir, before any generation; nothing touched.
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"--output-dir: .* already holds a quickstart run.*--output-dir DIR"):
        run_quickstart(tmp_path, overrides=[])
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics
