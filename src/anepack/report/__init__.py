"""Reports of runs for people: one self-contained HTML file with embedded plots."""
