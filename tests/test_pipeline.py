"""The data pipeline's own pieces that need no Ray session (raysft.data.pipeline)."""

from __future__ import annotations

import pytest
import ray.data

from raysft.data.pipeline import quiet_data_context


def test_quiet_data_context_restores_the_process_wide_settings() -> None:
    context = ray.data.DataContext.get_current()
    before = (context.execution_options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    with pytest.raises(KeyError), quiet_data_context(preserve_order=True) as inside:
        assert inside is context
        assert (context.execution_options.preserve_order, context.enable_progress_bars) == (True, False)
        assert context.print_on_execution_start is False
        raise KeyError("the job failed")  # the settings come back on the way out of a failed job too
    after = (context.execution_options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    assert after == before
