"""The model registry: register bundles as MLflow pyfunc models with lineage, gate their promotion
to ``@champion``, roll back, and trace a version to its raw inputs.

Modules: pyfunc_model (the model MLflow loads, as code), register (the register step), gate (the
pure promotion decision), promote (the promote step, forced promotion, rollback; under a lock),
lineage (where a version came from). MLflow calls go through flows.tracking.Registry.
"""
