"""Reading corpora and planning contexts."""
