"""alignprop-ray: AlignProp reward fine-tuning of diffusion models, orchestrated with Ray."""

import os

__version__ = "0.1.0"

# MLflow 3.17 starts a telemetry thread at import that, when it cannot reach its server (clusters without
# egress, this project's CI), removes `_MLFLOW_TELEMETRY_SESSION_ID` from os.environ while other threads
# may be iterating it: the scale run of RELIABILITY.md lost a trial's first MLflow call to that race
# (`KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`). Every process of ours imports this module before MLflow;
# a user who wants the telemetry sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
