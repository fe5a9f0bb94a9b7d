"""genserve's server version, reported in provenance and KServe's ServerMetadata."""

SERVER_VERSION = "0.1.0"
