"""Report2CT: the model. Pure torch (+ MONAI networks, transformers).

Imports no ray, deepspeed or boto3, ever: training and the factory both build
on it, and it must stay light enough to load inside any worker.
"""
