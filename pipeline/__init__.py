"""DALI input pipeline: the train view, the centre crop and the 10 crops, behind ``Loader``.

    from pipeline import Loader, reference
See pipeline/loader.py (the API), pipeline/graphs.py (the DALI graphs) and
pipeline/reference.py (the numpy/PIL oracle of the same views).
"""
from pipeline import reference
from pipeline.finish import U8Batch, finish
from pipeline.errors import LoaderError
from pipeline.loader import Draws, Loader, LoaderOptions

__all__ = ["Loader", "LoaderOptions", "LoaderError", "Draws", "U8Batch", "finish", "reference"]
