"""Hardware telemetry logged next to the training metrics (GPU state per rank via NVML)."""
