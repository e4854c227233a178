"""Running: params and config records, whole runs (workflow), MLflow tracking, several processes and devices, process tuning, and the `kip` command."""
