"""The chest phantom world: procedural chest CTs with known findings, their reports, and CT-RATE-layout datasets."""
