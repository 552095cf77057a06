"""Credit ledger and key store: one interface (`base.Store`), one file per backend."""

from r1nest.ledger.base import KeyRecord, Posting, Reservation, Store

__all__ = ["KeyRecord", "Posting", "Reservation", "Store"]
