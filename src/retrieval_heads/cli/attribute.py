"""`retrieval-heads attribute` (issue 19). Placeholder."""
