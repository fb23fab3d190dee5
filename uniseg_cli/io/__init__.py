"""Files: image reading and writing, atomic outputs, JSON."""
