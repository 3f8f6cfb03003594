"""Chunks: the one file/wire format every tier stores (`chunk.format`) and how a token sequence
is cut into chunks and keyed (`chunk.planner`).

Nothing is imported here: `chunk.format`'s header parsing runs without torch (the disk tools
`inspect`, `verify`, `clear` import it without torch)."""
