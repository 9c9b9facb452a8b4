"""What the pipeline runner hands every stage beside its config section and inputs.

A stage never reads another stage's section; the few things every stage needs from the pipeline
-- where shared caches live, its MLflow run, which Ray to use -- come in a :class:`StepContext`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flows.config import ClusterConfig, TrackingConfig
from flows.progress import Progress
from flows.tracking import Tracker
from flows.workdir import FingerprintCache


@dataclass(frozen=True)
class StepContext:
    workdir: Path
    """The pipeline's workdir: caches shared by steps (builtin corpus, imported models, Ray
    runs)."""
    tracker: Tracker = field(default_factory=Tracker)
    """The step's own MLflow run (a no-op when tracking is off)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where the registry is, for stages that resolve models:/ URIs."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The Ray cluster a stage connects to before its first Ray work."""
    fingerprints: FingerprintCache = field(default_factory=lambda: FingerprintCache(None))
    """File fingerprints by (path, size, mtime), shared by the runner and the stages."""
    fresh: bool = False
    """The runner was told to redo this step (--force): stages discard resumable partial state."""
    parent_run_id: str | None = None
    """The pipeline's parent MLflow run (lineage for the registry)."""
    step_runs: Mapping[str, str] = field(default_factory=dict)
    """MLflow run id of every finished step of this pipeline, by step name (lineage for the
    registry)."""
    progress: Progress = field(default_factory=Progress)
    """Where the stage reports how far it is (flows/progress.py); the default shows nothing."""
