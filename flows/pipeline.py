"""The pipeline as it stands: preprocess -> pretrain -> finetune (when SFT data is given).

One parent MLflow run, one nested run per stage; each stage reuses a finished output with the
same config and inputs (its DONE marker), so a re-run only does what changed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flows.config import PipelineConfig
from flows.tracking import stage_run

log = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage in order; return the last model bundle directory."""
    from flows.preprocess import preprocess
    from flows.train import train

    with stage_run(cfg.tracking, cfg.workdir, "pipeline") as parent:
        dataset = preprocess(cfg)
        log.info("dataset: %s", dataset)
        if not cfg.pretrain.data:
            cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, data=str(dataset)))
        bundle = train(cfg, "pretrain")
        log.info("pretrained bundle: %s", bundle)
        parent.set_tags({"gptflow.dataset": str(dataset), "gptflow.pretrain_bundle": str(bundle)})
        if cfg.data.sft_inputs:
            finetune = dataclasses.replace(
                cfg.finetune, data=cfg.finetune.data or str(dataset), init=cfg.finetune.init or str(bundle)
            )
            bundle = train(dataclasses.replace(cfg, finetune=finetune), "finetune")
            log.info("fine-tuned bundle: %s", bundle)
            parent.set_tags({"gptflow.finetune_bundle": str(bundle)})
    return bundle
