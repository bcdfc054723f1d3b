"""Shared builders for the tests. Process launchers live in iomt.supervisor,
iomt.local_broker and iomt.local_cloud."""
