"""Patient records for training and inference: built from the store (:mod:`.records`) with
the pure preprocessing functions (:mod:`.preprocess`), or loaded from a hospital's own folder
(:mod:`.byod`); frozen note embeddings (:mod:`.text_embedding`)."""
