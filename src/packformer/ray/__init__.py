"""packformer on Ray: bulk embedding of datasets (`embed_dataset`) and replicated serving (`serve`).

Ray is an optional extra: `import packformer.ray` works without it, and calling into it raises an
ImportError that says what to install (pip install -e ".[ray]").
"""
from __future__ import annotations

from .dataset import RAY_MISSING, EmbedSummary, embed_dataset, require_ray

__all__ = ["embed_dataset", "EmbedSummary", "require_ray", "RAY_MISSING"]
