"""Inference at the edge: the global model in ONNX Runtime (:mod:`.onnx_export`,
`iomt edge predict` in :mod:`.onnx_predict`) and the features of a clinician's encrypted
query (:mod:`.query`)."""
