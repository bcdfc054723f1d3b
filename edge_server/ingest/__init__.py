"""Ingest: the hospital's daemon (`iomt edge run`) subscribes to its broker, validates each
delivery (:mod:`.ingestor`), stores rows as received (:mod:`.store`, :mod:`.sqlite_store`,
optional :mod:`.influx`), rebuilds patient records in the background, and reports
(:mod:`.metrics`, :mod:`.status`); :mod:`.settings` configures it."""
