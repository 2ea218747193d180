"""The training process of a Pipes session: ``python -m assets.pipes_training TASK_DIR
ARTIFACTS TRAIN_JSON DEVICE_JSON``, alone or as each of ``torchrun``'s processes.

It imports ``dagster_pipes`` (the small protocol package), never ``dagster``, so a training
image needs torch and this project but no orchestrator. It lives in ``assets/`` rather than
``mtmc_pipeline/`` because it speaks Dagster's protocol, and the core stays free of any Dagster
package. Rank 0 opens the Pipes session: its log lines stream back as they are written, then
it reports the materialisation with its data version and says where the stage's result is;
the other ranks train silently.

The result (history table, curves as PNG, numbers) goes into a JSON file next to the
checkpoint, on the artifact storage the step reads too, and the message carries its path:
Dagster's file message readers tail a file line by line, and a line of tens of kilobytes can
be read before it is completely written, which ends the reading of the session.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dagster_pipes import open_dagster_pipes

from mtmc_pipeline.artifacts import TaskArtifacts, write_json
from mtmc_pipeline.config import TrainConfig
from mtmc_pipeline.stages.result_json import to_json
from mtmc_pipeline.stages.training import run_training_process

RESULT_FILE = "model-result.json"


def main(argv: list[str]) -> int:
    task_dir, artifacts, train, device = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    art = TaskArtifacts(artifacts, task_dir.name)
    config = TrainConfig.model_validate(json.loads(train))
    settings = json.loads(device)
    if os.environ.get("RANK", "0") != "0":
        run_training_process(task_dir, art, config, settings)
        return 0
    with open_dagster_pipes() as pipes:
        result = run_training_process(task_dir, art, config, settings, pipes.log.info)
        assert result is not None  # rank 0 always has it
        path = art.work_dir / RESULT_FILE
        write_json(path, to_json(result))
        pipes.report_custom_message({"result": str(path)})
        pipes.report_asset_materialization(
            metadata={"fingerprint": result.fingerprint, "reused": result.reused},
            data_version=result.fingerprint,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
