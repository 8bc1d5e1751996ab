"""MRIDeIdentify engine: de-identify head MRI by remodeling everything outside the brain.

The engine is pure Python (SimpleITK, numpy, torch) and knows nothing of Qt or Slicer; the Slicer
module and the ``mri-deidentify`` command are thin shells around :func:`deidentify`.
"""

__version__ = "0.1.0"
