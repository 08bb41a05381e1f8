"""captioning stage."""
