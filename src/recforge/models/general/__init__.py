"""General (non-sequential) collaborative filtering models."""
