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

# gRPC's C core (grpcio 1.85) with GRPC_VERBOSITY unset logs at INFO: a line on stderr, not in
# --log-json's format, for every connection that fails its TLS handshake (a plaintext client, a
# scanner), so anyone reaching the port wrote the log at will. ERROR keeps the core's errors (a
# compressed request's refusal: docs/operations.md); an operator's own GRPC_VERBOSITY wins. Here,
# before any module imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
