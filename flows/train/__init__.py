"""Training: Ray Train + DeepSpeed pretraining and fine-tuning (one loop for both).

Driver side: prepare (every check before any worker starts), ds_config (the generated DeepSpeed
config), checkpoint (resume guard; also the workers' save and load), driver (the stage). Worker
side: loop (the training loop), engine (DeepSpeed engine, update gate), bundle (the bundle written
at the end), windows (deterministic batches from token shards), telemetry. faults: test-only.
"""
