"""The Slicer side of the module: what needs Slicer's MRML classes but is not panel wiring.

``MRIDeIdentify.py`` keeps the Widget (wiring) and the Logic (the steps in order); the work is done by the Qt-free
engine ``MRIDeIdentifyLib``, which never imports this package. One file per job, in the order of a run:

dependencies.py  what the engine needs in Slicer's Python: checked, then installed on first use after asking
nodes.py         volume and segmentation nodes <-> the engine's SimpleITK images (exact grid, voxel type)
childprocess.py  a run in a child process (Slicer's own Python): temporary files in, progress lines, results out
worker.py        the child's side: reads the files, calls ``pipeline.deidentify``, writes the results
messages.py      engine messages in the panel's words (controls, not command-line flags)
views.py         the before/after check: dual 3-D layout, fitted volume rendering, cameras on the face

No module here imports torch, SimpleITK or the engine when it is imported (Slicer imports the module file at
start-up, before PyTorch may be installed); they are imported where used.
"""
