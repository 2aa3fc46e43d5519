"""Data: the CT-RATE layout reader and the procedural chest phantom world."""
