"""Federation: `iomt edge federate` (:mod:`.client`) takes part in secret-shared rounds:
registers, trains, uploads one committed sharing per round, fetches the global model."""
