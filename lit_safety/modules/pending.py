"""Modules that configs/ already name but that have not landed yet: they fail loudly, never silently."""

from __future__ import annotations

import lightning as L


class _Pending(L.LightningModule):
    issue = ""

    def __init__(self, model: str = "organism-dense-aligned") -> None:
        raise NotImplementedError(
            f"{type(self).__name__} is not implemented yet ({self.issue}); "
            "see configs/ for the jobs that are available"
        )


class SafetyEvalModule(_Pending):
    """Safety and utility evaluation (not implemented yet)."""

    issue = "evaluation"
