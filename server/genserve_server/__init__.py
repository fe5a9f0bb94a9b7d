"""genserve's model server (genserve-server)."""

import os

# ONNX Runtime (1.31) keeps a telemetry device id and an event database under $XDG_CACHE_HOME (or
# $HOME/.cache)/Microsoft/DeveloperTools/.onnxruntime from its import on, and queues events to upload.
# Where that cannot be written (deploy/k8s: readOnlyRootFilesystem, HOME /opt/genserve owned by root)
# it prints a coloured warning on stderr before logging starts: the one line that is not JSON under
# --log-json. The server writes only where its flags and config name: telemetry is off unless the
# environment sets ORT_DISABLE_TELEMETRY itself (0 turns it on). Here, before any module imports
# onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
