"""visualize stage."""
