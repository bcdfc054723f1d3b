"""One daemon per hospital: ingest from the hospital broker, validate, preprocess, store
durably, train the multimodal model with differential privacy, run the global model."""
