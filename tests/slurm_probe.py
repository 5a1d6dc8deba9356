"""Stands in for a stage inside a SLURM job: records what the job was given (SLURM's variables, the
GPUs it sees, its CPUs) as JSON in the file it is passed. For a training job it then does what the
train stage does first: asks ``launch_command`` how to use the allocation, and, where that is srun
(one launcher per node), runs it with this probe in place of the stage, so each node's launcher
records the torchrun command it would start.

    python slurm_probe.py OUT.json KIND
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from selfperceptual.pipeline.distributed import NODE_LAUNCHER_ENV, launch_command, launch_environment


def main(out: Path, kind: str) -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    record = {
        "env": {key: value for key, value in os.environ.items() if key.startswith("SLURM") or key == "CUDA_VISIBLE_DEVICES"},
        "gpus": len(visible.split(",")) if visible else 0,
    }
    if kind == "train":
        command = launch_command(["train"], record["gpus"], os.environ)
        record["launch"] = command
        if NODE_LAUNCHER_ENV in os.environ:  # one node's launcher
            out = out.with_name(f"{out.name}.node{os.environ['SLURM_NODEID']}")
        elif command and command[0] == "srun":
            stage = command.index(sys.executable)
            probe = [*command[:stage], sys.executable, __file__, str(out), kind]
            result = subprocess.run(probe, env=launch_environment(probe), capture_output=True, text=True, check=False)
            record["srun"] = {"returncode": result.returncode, "output": (result.stdout + result.stderr)[-3000:]}
    out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
