"""Evaluation: does a generated volume show what its report says?

Label fidelity (a 3D multi-label classifier trained on real phantoms), 2.5D
FID per plane, CLIP-style report/volume alignment, ablations, and the
`ctfactory evaluate` report. Imports report2ct, phantom, training and factory;
nothing but `jobs` imports it.
"""
