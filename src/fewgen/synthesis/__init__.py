"""Synthesis: the content-addressed store of generated images and its sharding over processes."""
