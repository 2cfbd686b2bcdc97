"""DP-SGD: per-example clipping, secure noise, accounting, the ledger, registered datasets."""
