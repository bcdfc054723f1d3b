"""One edge server per hospital, grouped by what it does: :mod:`.ingest` (broker to durable
store), :mod:`.dataset` (patient records), :mod:`.training` (the multimodal model with
patient-level DP-SGD and its privacy ledger), :mod:`.federation` (secret-shared rounds),
:mod:`.inference` (ONNX Runtime and encrypted-query features) and :mod:`.web` (the
clinician's page)."""
