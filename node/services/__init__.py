"""Services a node runs beside training: chain link, hop receipts, audit, paid inference."""
