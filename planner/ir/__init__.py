"""The Plan IR: frozen dataclasses with one canonical JSON form, its schema, and safe file I/O."""
